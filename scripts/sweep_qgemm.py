"""Every tile of the int8 Triton GEMM (fastllm.kernels.qgemm) at throughput-sized token counts,
on the Llama-3-8B layer shapes, against cuBLAS' bf16 GEMM and the dequantize-then-cuBLAS path:
which tile is best per shape, how far the autotuner's pick lands from it, and how far the best
is from cuBLAS. Four weight copies rotated (L2 does not hold the weight), CUDA-graph timed.

With --w8a8, instead: int8's W8A8 mode (activations quantized per token, then
fastllm.kernels.w8a8), through pointer loads and through TMA, against cuBLAS' bf16.

Usage: python scripts/sweep_qgemm.py OUTDIR [--ms=256,512,1024] [--extra] [--int4] [--w8a8]
(--extra: also tiles outside qgemm.CONFIGS; --int4: the int4 g128 kernel too). Prints one line
per (shape, tokens), JSON in OUTDIR.
"""
import json
import sys

import torch
import torch.nn.functional as F
import triton

from fastllm.bench.common import LLAMA3_8B_LINEARS, graph_time, script_out_dir
from fastllm.kernels import qgemm as Q
from fastllm.kernels import w8a8 as W
from fastllm.stages.quantizers.int4 import quantize_int4
from fastllm.stages.quantizers.int8 import quantize_int8, quantize_int8_rows

out_dir = script_out_dir(__doc__)
dev = torch.device("cuda")
MS = [int(v) for a in sys.argv if a.startswith("--ms=") for v in a.split("=")[1].split(",")] or [256, 512, 1024]
EXTRA = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SWAP": sw}, num_warps=w, num_stages=s)
         for m, n, k, w, s, sw in [(256, 128, 64, 8, 4, True), (256, 128, 128, 8, 2, True), (128, 128, 64, 8, 4, True),
                                   (128, 64, 64, 4, 4, True), (256, 64, 64, 8, 3, True), (128, 128, 64, 4, 4, True),
                                   (128, 256, 64, 8, 3, False), (128, 128, 64, 8, 4, False)]]
CONFIGS = Q.CONFIGS + (EXTRA if "--extra" in sys.argv else [])
COPIES = 4

report: dict = {"device": torch.cuda.get_device_name(), "results": []}
lines = []
for name, (N, K) in LLAMA3_8B_LINEARS.items():
    w16 = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5 for _ in range(COPIES)]
    q8 = [quantize_int8(t) for t in w16]
    q4 = [quantize_int4(t, 128) for t in w16] if "--int4" in sys.argv else []
    for M in MS:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        it = iter(range(10 ** 9))
        t_bf16 = graph_time(lambda: F.linear(x, w16[next(it) % COPIES]))
        row = {"layer": name, "N": N, "K": K, "M": M, "bf16_us": t_bf16 * 1e6}
        if "--w8a8" in sys.argv:
            xq, xs = quantize_int8_rows(x)
            ref = (xq.double() @ q8[0][0].double().T) * xs.double() * q8[0][1].double()[None, :]
            for tma in (False, True):
                y = W.w8a8_matmul(xq, xs, *q8[0], None, x.dtype, tma=tma)
                row[f"w8a8_tma{tma}_err"] = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                it = iter(range(10 ** 9))

                def w8a8(tma=tma):
                    q, s = q8[next(it) % COPIES]
                    return W.w8a8_matmul(*quantize_int8_rows(x), q, s, None, x.dtype, tma=tma)
                row[f"w8a8_tma{tma}_us"] = graph_time(w8a8) * 1e6
            report["results"].append(row)
            line = (f"{name:8s} M={M:5d} bf16 {t_bf16 * 1e6:7.1f} us | w8a8 pointers {row['w8a8_tmaFalse_us']:7.1f} "
                    f"({t_bf16 * 1e6 / row['w8a8_tmaFalse_us']:.2f}x) TMA {row['w8a8_tmaTrue_us']:7.1f} "
                    f"({t_bf16 * 1e6 / row['w8a8_tmaTrue_us']:.2f}x, err {row['w8a8_tmaTrue_err']:.1e})")
            print(line, flush=True)
            lines.append(line)
            continue
        it = iter(range(10 ** 9))

        def dense():
            q, s = q8[next(it) % COPIES]
            return F.linear(x, Q.dequantize_rows(q, s, x.dtype))
        row["int8_dense_us"] = graph_time(dense) * 1e6
        it = iter(range(10 ** 9))

        def tuned():
            q, s = q8[next(it) % COPIES]
            return Q.qgemm_rows(x, q, s)
        row["int8_tuned_us"] = graph_time(tuned) * 1e6
        row["int8_tuned_pick"] = str(Q._tuned.best_config)
        ref = F.linear(x.double(), (q8[0][0].double() * q8[0][1].double()[:, None]))
        row["int8_configs"] = {}
        for cfg in CONFIGS:
            try:
                y = Q.qgemm_rows(x, *q8[0], config=cfg)
                err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                it = iter(range(10 ** 9))

                def forced(cfg=cfg):
                    q, s = q8[next(it) % COPIES]
                    return Q.qgemm_rows(x, q, s, config=cfg)
                row["int8_configs"][str(cfg)] = {"us": graph_time(forced) * 1e6, "rel_err": err}
            except Exception as e:  # out of shared memory / registers for this tile
                row["int8_configs"][str(cfg)] = {"error": str(e)[:120]}
        ok = {k: v for k, v in row["int8_configs"].items() if "us" in v}
        best = min(ok, key=lambda k: ok[k]["us"])
        row["int8_best"] = best
        if q4:
            it = iter(range(10 ** 9))

            def int4():
                p, s, z = q4[next(it) % COPIES][:3]
                return Q.qgemm_int4(x, p, s, z, 128)
            row["int4_tuned_us"] = graph_time(int4) * 1e6
        report["results"].append(row)
        line = (f"{name:8s} M={M:5d} bf16 {t_bf16 * 1e6:7.1f} us | int8 tuned {row['int8_tuned_us']:7.1f} "
                f"({t_bf16 * 1e6 / row['int8_tuned_us']:.2f}x) best {ok[best]['us']:7.1f} "
                f"({t_bf16 * 1e6 / ok[best]['us']:.2f}x, err {ok[best]['rel_err']:.1e}) dense {row['int8_dense_us']:7.1f} "
                f"({t_bf16 * 1e6 / row['int8_dense_us']:.2f}x)"
                + (f" | int4 {row['int4_tuned_us']:7.1f}" if q4 else "") + f"\n    best: {best}")
        print(line, flush=True)
        lines.append(line)
    w16 = q8 = q4 = None  # freed before the next shape
    torch.cuda.empty_cache()
(out_dir / "sweep_qgemm.json").write_text(json.dumps(report, indent=1))
print("\n".join(lines))

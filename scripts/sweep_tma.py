"""The batch-1 word GEMVs with TMA-pipelined weights (every configuration of gemv.TMA_CONFIGS and
gemv_int4.TMA_CONFIGS) against the register-prefetch word kernels (autotuned), int8, fp8 and int4
g128 on the Llama-2-7B shapes: eight weight copies rotated, graph-timed, PDL on.
Usage: python scripts/sweep_tma.py OUTDIR [--int4-only] [--dp4a-only]; int4 also in integer arithmetic
("dp4a"; --dp4a-only: int4 in it alone). Prints a table last; JSON in OUTDIR."""
import json
import sys

import torch

from fastllm.bench.common import LLAMA2_7B_LINEARS, graph_time, script_out_dir
from fastllm.kernels import gemv as G
from fastllm.kernels import gemv_int4 as G4
from fastllm.stages.quantizers.fp8 import quantize_fp8
from fastllm.stages.quantizers.int4 import dequantize_int4, pack_scales, quantize_int4
from fastllm.stages.quantizers.int8 import quantize_int8

out_dir = script_out_dir(__doc__)
dev = torch.device("cuda")
SHAPES = LLAMA2_7B_LINEARS
report: dict = {"device": torch.cuda.get_device_name(), "results": []}
lines = []


def rot(fn):
    it = iter(range(10 ** 9))
    return graph_time(lambda: fn(next(it) % 8)) * 1e6


def err_of(out, ref):
    return ((out.double().view(-1) - ref.view(-1)).norm() / ref.norm()).item()


for name, (N, K) in SHAPES.items():
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    w = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(8)]
    quant = {"int8": [quantize_int8(t) for t in w], "fp8": [quantize_fp8(t) for t in w]}
    q4 = [quantize_int4(t, 128) for t in w]
    del w
    torch.cuda.empty_cache()
    pairs = [pack_scales(s, z) for _, s, z in q4]
    res = {}
    for kind, qs in quant.items():
        if "--int4-only" in sys.argv:
            break
        ref = (x.double() @ qs[0][0].double().T) * qs[0][1].double()
        res[f"{kind} words"] = rot(lambda i, qs=qs: G.gemv(x, qs[i][0], scale=qs[i][1], tma=False))
        res[f"{kind} tma autotuned"] = rot(lambda i, qs=qs: G.gemv(x, qs[i][0], scale=qs[i][1], tma=True))
        for cfg in G.TMA_CONFIGS:
            assert err_of(G.gemv(x, qs[0][0], scale=qs[0][1], config=cfg, tma=True), ref) < 2e-2, (kind, str(cfg))
            res[f"{kind} tma {cfg}"] = rot(lambda i, qs=qs, cfg=cfg: G.gemv(x, qs[i][0], scale=qs[i][1], config=cfg,
                                                                        tma=True))
    ref4 = x.double() @ dequantize_int4(*q4[0], K).double().T
    res["int4 words"] = rot(lambda i: G4.gemv_int4(x, *q4[i], 128, pairs=pairs[i], tma=False))
    res["int4 tma autotuned"] = rot(lambda i: G4.gemv_int4(x, *q4[i], 128, pairs=pairs[i], tma=True))
    for cfg in G4._prune_tma(G4.TMA_CONFIGS, dict(G=128)):
        if "--dp4a-only" not in sys.argv:
            assert err_of(G4.gemv_int4(x, *q4[0], 128, pairs=pairs[0], config=cfg, tma=True), ref4) < 2e-2, str(cfg)
            res[f"int4 tma {cfg}"] = rot(lambda i, cfg=cfg: G4.gemv_int4(x, *q4[i], 128, pairs=pairs[i], config=cfg,
                                                                         tma=True, dp4a=False))
        assert err_of(G4.gemv_int4(x, *q4[0], 128, pairs=pairs[0], config=cfg, tma=True, dp4a=True), ref4) < 2e-2
        res[f"int4 dp4a {cfg}"] = rot(lambda i, cfg=cfg: G4.gemv_int4(x, *q4[i], 128, pairs=pairs[i], config=cfg,
                                                                      tma=True, dp4a=True))
    report["results"].append(dict(shape=name, N=N, K=K, us=res))
    (out_dir / "sweep_tma.json").write_text(json.dumps(report, indent=1))
    for kind in ("int4",) if "--int4-only" in sys.argv else ("int8", "fp8", "int4"):
        nbytes = N * K // 2 + N * K // 128 * 8 if kind == "int4" else N * K
        best = min(((t, k) for k, t in res.items() if k.startswith(kind + " tma ") and "autotuned" not in k),
                   default=(float("nan"), " tma -"))
        words, auto = res[f"{kind} words"], res[f"{kind} tma autotuned"]
        line = (f"{name:8s} {kind}: words {words:6.1f} us ({nbytes / words / 1e6:.2f} TB/s); tma autotuned {auto:6.1f}; "
                f"tma best {best[0]:6.1f} ({nbytes / best[0] / 1e6:.2f} TB/s) [{best[1].split(' tma ')[1]}]")
        if kind == "int4":
            d = min((t, k) for k, t in res.items() if k.startswith("int4 dp4a "))
            line += f"; dp4a best {d[0]:6.1f} ({nbytes / d[0] / 1e6:.2f} TB/s) [{d[1].split(' dp4a ')[1][:40]}]"
        lines.append(line)
        print(line, flush=True)
print("\n==== summary ====\n" + "\n".join(lines))

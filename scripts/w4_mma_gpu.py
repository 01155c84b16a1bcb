"""int4 (g128) products of a few tokens through fastllm.kernels.cuda_w4 (mma.sync, each group's sum
scaled once) against cuBLAS' bf16 and the Triton int4 GEMM (fastllm.kernels.qgemm), per Llama-2-7B
layer: eight weight copies rotated so L2 does not hold them, CUDA-graph timed; each checked against
the float64 product of the dequantized weight. The kernel is timed at its pick for the shape and at
each of --splits, with 4 and 8 warps per CTA of 16 or 32 weight rows per warp.

Usage: python scripts/w4_mma_gpu.py OUTDIR [--ms=16,32,64,128] [--splits=1,2,4,8,16]. Prints a
table last, JSON in OUTDIR.
"""
import json
import sys

import torch
import torch.nn.functional as F

from fastllm.bench.common import LLAMA2_7B_LINEARS, graph_time, print_layer_sums, script_out_dir
from fastllm.kernels import cuda_w4 as W4
from fastllm.kernels import qgemm as Q
from fastllm.stages.quantizers.int4 import dequantize_int4, pack_scales, quantize_int4

out_dir = script_out_dir(__doc__)
arg = lambda name, default: [int(v) for a in sys.argv if a.startswith(f"--{name}=")  # noqa: E731
                             for v in a.split("=")[1].split(",")] or default
MS, SPLITS = arg("ms", [16, 32, 64, 128]), arg("splits", [1, 2, 4, 8, 16])
COPIES = 8
dev = torch.device("cuda")
rows, lines = [], []
for name, (N, K) in LLAMA2_7B_LINEARS.items():
    w16 = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5 for _ in range(COPIES)]
    q4 = [quantize_int4(w, 128) for w in w16]
    ops = [(p, s, z, pack_scales(s, z)) for p, s, z in q4]
    wd = dequantize_int4(*q4[0], K).double()
    for M in MS:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        ref = x.double() @ wd.T
        row = {"layer": name, "N": N, "K": K, "M": M, "us": {}, "err": {}}

        def timed(label, fn):
            row["err"][label] = ((fn(*ops[0]).double() - ref).norm() / ref.norm()).item()
            it = iter(range(10 ** 9))
            row["us"][label] = graph_time(lambda: fn(*ops[next(it) % COPIES])) * 1e6

        it16 = iter(range(10 ** 9))
        row["err"]["bf16"] = ((F.linear(x, wd.to(torch.bfloat16)).double() - ref).norm() / ref.norm()).item()
        row["us"]["bf16"] = graph_time(lambda: F.linear(x, w16[next(it16) % COPIES])) * 1e6
        timed("triton", lambda p, s, z, pr: Q.qgemm_int4(x, p, s, z, 128))
        timed("mma", lambda p, s, z, pr: W4.w4_mma(x, p, pr, 128))  # (the timed pick)
        for wp, rt in ((8, 1), (4, 1), (4, 2), (8, 2)):
            for sp in SPLITS:
                timed(f"mma/w{wp}r{rt}/s{sp}", lambda p, s, z, pr: W4.w4_mma(x, p, pr, 128, splits=sp, warps=wp,
                                                                               row_tiles=rt))
        rows.append(row)
        best = min((v, k) for k, v in row["us"].items() if k.startswith("mma/"))
        line = (f"{name:8s} M={M:4d} " + " ".join(f"{k} {row['us'][k]:6.1f}us ({row['us']['bf16'] / row['us'][k]:.2f}x)"
                                                  for k in ("bf16", "triton", "mma"))
                + f" best {best[1]} {best[0]:6.1f}us ({row['us']['bf16'] / best[0]:.2f}x)")
        lines.append(line)
        print(line + "\n    err " + " ".join(f"{k} {v:.1e}" for k, v in row["err"].items()), flush=True)
    w16 = q4 = ops = None
    torch.cuda.empty_cache()
(out_dir / "w4_mma_gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
print_layer_sums(rows, lines, ("bf16", "triton", "mma"))

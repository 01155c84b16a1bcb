"""The few-token int8 tensor-core GEMM (fastllm.kernels.cuda_few) against cuBLAS' bf16 and the
Triton GEMM (fastllm.kernels.qgemm, autotuned) per Llama-2-7B layer, eight weight copies rotated so
L2 does not hold them, CUDA-graph timed; each checked against float64.

Usage: python scripts/few_gpu.py OUTDIR [--ms=16,32,64] [--splits=1,2,4,8]. Prints a table last,
JSON in OUTDIR.
"""
import json
import sys

import torch
import torch.nn.functional as F

from fastllm.bench.common import LLAMA2_7B_LINEARS, graph_time, script_out_dir
from fastllm.kernels import cuda_few as FEW
from fastllm.kernels import qgemm as Q
from fastllm.stages.quantizers.int8 import quantize_int8

out_dir = script_out_dir(__doc__)
MS = [int(v) for a in sys.argv if a.startswith("--ms=") for v in a[5:].split(",")] or [16, 32, 64]
SPLITS = [int(v) for a in sys.argv if a.startswith("--splits=") for v in a[9:].split(",")]
COPIES = 8
dev = torch.device("cuda")
assert FEW.available(torch.zeros(1, device=dev)), "the few-token GEMM did not build or load (see the log)"
rows, lines = [], []
for name, (N, K) in LLAMA2_7B_LINEARS.items():
    w16 = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5 for _ in range(COPIES)]
    q8 = [quantize_int8(w) for w in w16]
    for M in MS:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        ref = F.linear(x.double(), q8[0][0].double() * q8[0][1].double()[:, None])
        row = {"layer": name, "N": N, "K": K, "M": M, "us": {}, "err": {}}

        def timed(label, fn, check=None):
            it = iter(range(10 ** 9))
            row["us"][label] = graph_time(lambda: fn(*q8[next(it) % COPIES])) * 1e6
            if check is not None:
                row["err"][label] = ((check.double() - ref).norm() / ref.norm()).item()

        it16 = iter(range(10 ** 9))
        row["us"]["bf16"] = graph_time(lambda: F.linear(x, w16[next(it16) % COPIES])) * 1e6
        timed("triton", lambda q, s: Q.qgemm_rows(x, q, s), Q.qgemm_rows(x, *q8[0]))
        timed("few", lambda q, s: FEW.gemm_few_int8(x, q, s), FEW.gemm_few_int8(x, *q8[0]))
        for sp in SPLITS:
            timed(f"few/{sp}", lambda q, s, sp=sp: FEW.gemm_few_int8(x, q, s, splits=sp),
                  FEW.gemm_few_int8(x, *q8[0], splits=sp))
        rows.append(row)
        line = f"{name:8s} M={M:3d} " + " ".join(
            f"{k} {v:6.1f}us ({row['us']['bf16'] / v:.2f}x)" for k, v in row["us"].items())
        lines.append(line)
        print(line, flush=True)
        print("    err " + " ".join(f"{k} {v:.1e}" for k, v in row["err"].items()), flush=True)
    w16 = q8 = None
    torch.cuda.empty_cache()
(out_dir / "few_gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
sums = {}
for r in rows:
    for k, v in r["us"].items():
        sums.setdefault(r["M"], {}).setdefault(k, 0.0)
        sums[r["M"]][k] += v
print("\n==== summary ====\n" + "\n".join(lines))
for M, t in sums.items():
    print(f"four layers, M={M:3d}: " + " ".join(f"{k} {v:6.1f}us ({t['bf16'] / v:.2f}x)" for k, v in t.items()))

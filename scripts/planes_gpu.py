"""Weight-only int8 on the int8 tensor cores (fastllm.kernels.w8a8.w8a16_planes: activations as two
int8 planes) against cuBLAS' bf16, the Triton GEMM (fastllm.kernels.qgemm) and one-plane W8A8, per
Llama-2-7B layer; eight weight copies rotated so L2 does not hold them, CUDA-graph timed (the
activations' quantization included); each checked against the float64 weight-only product.

Usage: python scripts/planes_gpu.py OUTDIR [--ms=2,8,16,32,64,128,256]. Prints a table last, JSON in OUTDIR.
"""
import json
import sys

import torch
import torch.nn.functional as F

from fastllm.bench.common import LLAMA2_7B_LINEARS, graph_time, print_layer_sums, script_out_dir
from fastllm.kernels import qgemm as Q
from fastllm.kernels import w8a8 as W
from fastllm.stages.quantizers.int8 import quantize_int8, quantize_int8_rows

out_dir = script_out_dir(__doc__)
MS = [int(v) for a in sys.argv if a.startswith("--ms=") for v in a[5:].split(",")] or [2, 8, 16, 32, 64, 128, 256]
COPIES = 8
dev = torch.device("cuda")
rows, lines = [], []
for name, (N, K) in LLAMA2_7B_LINEARS.items():
    w16 = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5 for _ in range(COPIES)]
    q8 = [quantize_int8(w) for w in w16]
    for M in MS:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        x[:, 7] *= 50  # an outlier channel, as LLM activations have
        ref = F.linear(x.double(), q8[0][0].double() * q8[0][1].double()[:, None])
        row = {"layer": name, "N": N, "K": K, "M": M, "us": {}, "err": {}}

        def timed(label, fn):
            check = fn(*q8[0])
            row["err"][label] = ((check.double() - ref).norm() / ref.norm()).item()
            it = iter(range(10 ** 9))
            row["us"][label] = graph_time(lambda: fn(*q8[next(it) % COPIES])) * 1e6

        it16 = iter(range(10 ** 9))
        row["err"]["bf16"] = ((F.linear(x, (q8[0][0] * q8[0][1][:, None]).bfloat16()).double() - ref).norm()
                              / ref.norm()).item()  # cuBLAS on the same dequantized weight
        row["us"]["bf16"] = graph_time(lambda: F.linear(x, w16[next(it16) % COPIES])) * 1e6
        timed("triton", lambda q, s: Q.qgemm_rows(x, q, s))
        timed("planes", lambda q, s: W.w8a16_planes(x, q, s, None))
        if M >= 16:
            timed("w8a8", lambda q, s: W.w8a8_matmul(*quantize_int8_rows(x), q, s, None, x.dtype))
        rows.append(row)
        line = f"{name:8s} M={M:4d} " + " ".join(f"{k} {v:6.1f}us ({row['us']['bf16'] / v:.2f}x)"
                                                  for k, v in row["us"].items())
        lines.append(line)
        print(line + "\n    err " + " ".join(f"{k} {v:.1e}" for k, v in row["err"].items()), flush=True)
    w16 = q8 = None
    torch.cuda.empty_cache()
(out_dir / "planes_gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
print_layer_sums(rows, lines)

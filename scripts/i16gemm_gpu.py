"""int8 weights x 16-bit activations on the int8 tensor cores (fastllm.kernels.i16gemm) against
cuBLAS' bf16 and the int8 layer's present path (Triton GEMM below 1,024 tokens, dequantize +
cuBLAS from there), per layer, Llama-2-7B and Llama-3-8B shapes, graph-timed, eight weight
copies rotated. Each output is checked against float64.

Usage: python scripts/i16gemm_gpu.py OUTDIR [--ms=256,1024,4096]
Prints a table last; JSON in OUTDIR.
"""
import json
import sys

import torch
from torch import nn

from fastllm.bench.common import LLAMA2_7B_LINEARS, graph_time, script_out_dir
from fastllm.kernels import i16gemm as G
from fastllm.stages.quantizers.int8 import Int8Linear

out_dir = script_out_dir(__doc__)
dev = torch.device("cuda")
MS = [int(m) for a in sys.argv if a.startswith("--ms=") for m in a.split("=")[1].split(",")] or [256, 1024, 4096]
SHAPES = {**{"l2 " + k: v for k, v in LLAMA2_7B_LINEARS.items()},
          "l3 qkv": (6144, 4096), "l3 gate_up": (28672, 4096), "l3 down": (4096, 14336)}
rows, lines = [], []
for name, (N, K) in SHAPES.items():
    base = [nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16) for _ in range(8)]
    q8 = [Int8Linear(b) for b in base]
    for M in MS:
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        x[:, 7] *= 30  # an outlier channel, as LLM activations have
        w = q8[0].dequantize(torch.float64)
        ref = x.double() @ w.T
        row = {"layer": name, "N": N, "K": K, "M": M}
        with torch.inference_mode():
            variants = {
                "bf16": lambda i: base[i](x),  # noqa: B023
                "int8 now": lambda i: q8[i](x),  # noqa: B023
                "i16gemm": lambda i: G.i16gemm(x, q8[i].qweight, q8[i].scale),  # noqa: B023
            }
            hi, lo, sx = G.split_rows(x)
            for vname, fn in variants.items():
                y = fn(0)
                row[vname + "_err"] = ((y.double() - ref).norm() / ref.norm()).item()
                it = iter(range(10 ** 9))
                row[vname + "_us"] = graph_time(lambda: fn(next(it) % 8)) * 1e6  # noqa: B023
            row["split_us"] = graph_time(lambda: G.split_rows(x)) * 1e6  # noqa: B023
            row["pick"] = str(G._i16gemm_kernel.best_config)
        rows.append(row)
        (out_dir / "i16gemm_gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                             indent=1))
        line = (f"{name:10s} M={M:5d}: bf16 {row['bf16_us']:7.1f}us  int8 now {row['int8 now_us']:7.1f} "
                f"({row['bf16_us'] / row['int8 now_us']:.2f}x)  i16gemm {row['i16gemm_us']:7.1f} "
                f"({row['bf16_us'] / row['i16gemm_us']:.2f}x, split {row['split_us']:.1f})  err bf16 "
                f"{row['bf16_err']:.1e} now {row['int8 now_err']:.1e} i16 {row['i16gemm_err']:.1e}  {row['pick']}")
        lines.append(line)
        print(line, flush=True)
    base = q8 = None
    torch.cuda.empty_cache()
print(f"\n==== {torch.cuda.get_device_name()} ====\n" + "\n".join(lines))

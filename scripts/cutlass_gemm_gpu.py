"""The CUTLASS weight-only GEMMs (fastllm.kernels.cutlass_gemm) against cuBLAS' bf16, Triton's GEMM
and dequantize-then-cuBLAS, per Llama-3-8B layer, graph-timed (tests/unit/kernels/test_cutlass_gemm.py
checks them against float64).

Usage: python scripts/cutlass_gemm_gpu.py OUTDIR [--int4] [--graph-timing] [--ms=128,1024,4096];
builds the library (fastllm's kernel cache); int8 weights, or int4 in groups of 128 with --int4.
Prints a table last, JSON in OUTDIR. "picked": the candidate cutlass_gemm.w8a16 / w4a16 times
and takes for the shape (with --graph-timing, timed inside a CUDA graph: cutlass_gemm.GRAPH_TIMING).
"""
import json
import sys

import torch
import triton

from fastllm.kernels import cutlass_gemm as C
from fastllm.stages.quantizers.int4 import dequantize_int4, quantize_int4

LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
G = 128


def main() -> None:
    out = sys.argv[1]
    int4 = "--int4" in sys.argv
    C.GRAPH_TIMING = "--graph-timing" in sys.argv
    ms = [int(v) for a in sys.argv if a.startswith("--ms=") for v in a[5:].split(",")] or [128, 256, 1024, 4096, 16384]
    assert C.available(torch.zeros(1, device="cuda")), "the CUTLASS library did not build or load (see the log)"
    tiles = C._entry(0).int4.configs if int4 else C._entry(0).configs
    torch.manual_seed(0)
    rows = []
    for name, (N, K) in LAYERS.items():
        if int4:
            packed, scales, zeros = quantize_int4(torch.randn(N, K, device="cuda") * 0.02, G)
            ops = C.int4_operands(scales, zeros)
            w = dequantize_int4(packed, scales, zeros, K).bfloat16()

            def run(x, c):
                return C._int4(x, packed, scales, zeros, G, ops, c)

            def picked(x):
                return C.w4a16(x, packed, scales, zeros, G, ops)
        else:
            q = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
            s = torch.rand(N, device="cuda") * 0.01
            w = (q.float() * s[:, None]).bfloat16()

            def run(x, c):
                return C._int8(x, q, s, c)

            def picked(x):
                return C.w8a16(x, q, s)
        for M in ms:
            x = torch.randn(M, K, device="cuda").bfloat16()
            y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            t = {"bf16": triton.testing.do_bench_cudagraph(lambda: torch.mm(x, w.T, out=y))}
            for c in [C.TRITON, C.DENSE, *range(tiles)]:
                if c == C.TRITON and M > (C.TRITON_MAX_TOKENS_INT4 if int4 else C.TRITON_MAX_TOKENS):
                    continue
                label = {C.TRITON: "triton", C.DENSE: "dense"}.get(c, f"tile{c}")
                try:
                    run(x, c)  # (Triton's GEMM tunes itself outside the graph)
                    t[label] = triton.testing.do_bench_cudagraph(lambda: run(x, c))
                except RuntimeError as e:
                    print(e)
            picked(x)
            t["picked"] = triton.testing.do_bench_cudagraph(lambda: picked(x))
            rows.append({"layer": name, "M": M, "N": N, "K": K, "ms": t})
            print(f"{name:8s} M={M:6d} " + " ".join(f"{k}={v * 1e3:8.1f}us" for k, v in t.items()), flush=True)
    fmt = "int4 g128" if int4 else "int8"
    json.dump({"device": torch.cuda.get_device_name(), "format": fmt, "graph_timing": C.GRAPH_TIMING, "rows": rows},
              open(f"{out}/cutlass-gemm-{'int4' if int4 else 'int8'}.json", "w"), indent=1)
    print(f"\n==== {fmt}: speed-up over cuBLAS bf16 ====")
    for r in rows:
        t = r["ms"]
        print(f"{r['layer']:8s} M={r['M']:6d} " + " ".join(f"{k} {t['bf16'] / v:.2f}" for k, v in t.items() if k != "bf16"))
    sums = {}
    for r in rows:
        for k in ("bf16", "dense", "picked"):
            sums.setdefault(r["M"], {}).setdefault(k, 0.0)
            sums[r["M"]][k] += r["ms"][k]
    for M, t in sums.items():
        print(f"four layers, M={M:6d}: bf16 {t['bf16'] * 1e3:8.1f} us, dense {t['bf16'] / t['dense']:.2f}x, "
              f"picked {t['bf16'] / t['picked']:.2f}x")


if __name__ == "__main__":
    main()

"""The CUTLASS weight-only int8 GEMM (fastllm/kernels/cuda/gemm_w8a16.cu) against cuBLAS' bf16, the
Triton GEMM (qgemm_rows) and dequantize-then-cuBLAS, per Llama-3-8B layer, graph-timed.

Usage: python scripts/w8a16_gpu.py OUTDIR [--ms=64,256,1024,4096]; builds the library (fastllm's
kernel cache), checks every tile against float64 on odd shapes first; prints a table last, JSON
in OUTDIR. "picked": the candidate cutlass_w8a16.w8a16 times and takes for the shape.
"""
import json
import sys

import torch
import triton

from fastllm.kernels import cutlass_w8a16 as C
from fastllm.kernels import qgemm

LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def main() -> None:
    out = sys.argv[1]
    ms = [int(v) for a in sys.argv if a.startswith("--ms=") for v in a[5:].split(",")] or [64, 256, 1024, 2048, 4096, 16384]
    assert C.available(torch.zeros(1, device="cuda")), "the CUTLASS library did not build or load (see the log)"
    configs = C._entry(0).configs

    def cutlass(x, q, s, cfg, y=None):
        return C._run(x, q, s, cfg, y)

    torch.manual_seed(0)
    checks = []
    for M, N, K in [(37, 136, 272), (1, 8, 16), (300, 1000, 1040), (129, 264, 4096), (2050, 520, 176)]:
        x = torch.randn(M, K, device="cuda").bfloat16()
        q = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        s = torch.rand(N, device="cuda") * 0.01 + 1e-4
        ref = (x.double() @ q.double().T) * s.double()
        for cfg in range(configs):
            try:
                y = cutlass(x, q, s, cfg).double()
            except RuntimeError as e:  # (a shape CUTLASS refuses: -2)
                checks.append({"shape": [M, N, K], "config": cfg, "refused": str(e)})
                print(e, flush=True)
                continue
            err = ((y - ref).abs() / (ref.abs() + 1e-3 * ref.abs().max())).max().item()
            checks.append({"shape": [M, N, K], "config": cfg, "max_rel_err": err})
            print(f"check {M}x{N}x{K} config {cfg}: max rel err {err:.2e}", flush=True)
            assert err < 2 ** -7, (M, N, K, cfg, err)

    rows = []
    for name, (N, K) in LAYERS.items():
        q = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        s = torch.rand(N, device="cuda") * 0.01
        w = (q.float() * s[:, None]).bfloat16()
        for M in ms:
            x = torch.randn(M, K, device="cuda").bfloat16()
            y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            t = {"bf16": triton.testing.do_bench_cudagraph(lambda: torch.mm(x, w.T, out=y))}
            qgemm_rows = qgemm.qgemm_rows
            qgemm_rows(x, q, s)  # autotune outside the graph
            t["triton"] = triton.testing.do_bench_cudagraph(lambda: qgemm_rows(x, q, s))
            qgemm.dequantize_rows(q, s, torch.bfloat16)
            t["dequant+cublas"] = triton.testing.do_bench_cudagraph(
                lambda: torch.mm(x, qgemm.dequantize_rows(q, s, torch.bfloat16).T))
            for cfg in range(configs):
                try:
                    cutlass(x, q, s, cfg, y)
                    t[f"cutlass{cfg}"] = triton.testing.do_bench_cudagraph(lambda: cutlass(x, q, s, cfg, y))
                except RuntimeError as e:
                    t[f"cutlass{cfg}"] = None
                    print(e)
            best = min((v, k) for k, v in t.items() if k.startswith("cutlass") and v)
            pick = C._pick(x, q, s)
            t["picked"] = triton.testing.do_bench_cudagraph(lambda: C.w8a16(x, q, s))
            rows.append({"layer": name, "M": M, "N": N, "K": K, "ms": t, "best_cutlass": best[1], "pick": pick})
            print(f"{name:8s} M={M:6d} " + " ".join(f"{k}={v * 1e3:8.1f}us" if v else f"{k}=-" for k, v in t.items()),
                  flush=True)
    json.dump({"device": torch.cuda.get_device_name(), "checks": checks, "rows": rows},
              open(f"{out}/w8a16.json", "w"), indent=1)
    print("\n==== speed-up over cuBLAS bf16 ====")
    for r in rows:
        t = r["ms"]
        print(f"{r['layer']:8s} M={r['M']:6d} triton {t['bf16'] / t['triton']:.2f}  dequant {t['bf16'] / t['dequant+cublas']:.2f}  "
              f"cutlass best ({r['best_cutlass']}) {t['bf16'] / t[r['best_cutlass']]:.2f}  picked ({r['pick']}) {t['bf16'] / t['picked']:.2f}")
    sums = {}
    for r in rows:
        for k in ("bf16", "triton", "picked"):
            sums.setdefault(r["M"], {}).setdefault(k, 0.0)
            sums[r["M"]][k] += r["ms"][k]
    for M, t in sums.items():
        print(f"four layers, M={M:6d}: bf16 {t['bf16'] * 1e3:8.1f} us, triton {t['bf16'] / t['triton']:.2f}x, picked {t['bf16'] / t['picked']:.2f}x")


if __name__ == "__main__":
    main()

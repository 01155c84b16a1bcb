"""Is the 8-bit GEMV's 2.6 TB/s Triton's limit or the format's? scripts/cuda_gemv/gemv_i8.cu (an
int8 GEMV written in CUDA: each lane streams 16-byte chunks, UNROLL of them requested at once,
the first UNROLL before the PDL wait), built with nvcc into a shared library and called through
ctypes, checked against float64 on odd shapes, then timed in scripts/chain_gpu.py's chain (the
four GEMVs of a Llama-2-7B layer, 32 layers of distinct weights, one CUDA graph) beside
fastllm's Triton int8 word GEMV and bf16 GEMV; gemv8.cu's GEMV (the input in shared memory, two
register batches in turn, float or dp4a arithmetic); and gemv_i8.cu's loads without the
arithmetic (wrong results: the stream alone).

Usage: python scripts/cuda_gemv_probe.py OUTDIR [--lib=PATH] (default: build with nvcc into OUTDIR);
prints a table last, JSON in OUTDIR.
"""
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import torch

from fastllm.bench.common import LLAMA2_7B_LINEARS, graph_time, script_out_dir
from fastllm.kernels import gemv as G
from fastllm.stages.quantizers.int8 import quantize_int8

SRC = [Path(__file__).resolve().parent / "cuda_gemv" / f for f in ("gemv_i8.cu", "gemv8.cu")]
VARIANTS = [(r, u) for r in (1, 2, 4) for u in (4, 8)]
# gemv8.cu: (warps per CTA, UNROLL, DP4A)
VARIANTS8 = [(w, u, d) for d in (False, True) for w in (4, 8) for u in (2, 4, 8)]


def build(out_dir: Path) -> ctypes.CDLL:
    lib = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--lib=")), None)
    if lib is None:
        lib = str(out_dir / "libgemv_i8.so")
        subprocess.run(["nvcc", "-O3", "-arch=sm_90a", "-shared", "-Xcompiler", "-fPIC", "-o", lib, *map(str, SRC)],
                       check=True)
    so = ctypes.CDLL(lib)
    for fn in (so.gemv_i8_launch, so.gemv8_launch):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 6 + [ctypes.c_size_t]
    return so


def main() -> None:
    out_dir = script_out_dir(__doc__)
    so = build(out_dir)
    dev = torch.device("cuda")

    def launch(fn, x, q, s, *variant):
        """y = fn's GEMV of x (both entry points take q, x, s, y, N, K, then four ints, then the stream)."""
        N, K = q.shape
        y = torch.empty(N, dtype=torch.bfloat16, device=dev)
        err = fn(q.data_ptr(), x.data_ptr(), s.data_ptr(), y.data_ptr(), N, K, *map(int, variant),
                 torch.cuda.current_stream().cuda_stream)
        assert err == 0, f"launch failed: {err}"
        return y

    def cuda_gemv(x, q, s, rpw, unroll, pdl, compute=True):
        return launch(so.gemv_i8_launch, x, q, s, rpw, unroll, pdl, compute)

    def cuda_gemv8(x, q, s, warps, unroll, dp4a, pdl=True):
        return launch(so.gemv8_launch, x, q, s, warps, unroll, pdl, dp4a)

    # correctness: odd row counts, K not a multiple of 32 x 16 x UNROLL, against float64
    worst = 0.0
    for N, K in [(1, 16), (37, 528), (129, 4096), (4099, 11008), (300, 8208)]:
        x = torch.randn(K, device=dev, dtype=torch.bfloat16)
        q, s = quantize_int8(torch.randn(N, K, device=dev, dtype=torch.bfloat16))
        ref = (q.double() @ x.double()) * s.double()
        for rpw, unroll in VARIANTS:
            for pdl in (False, True):
                y = cuda_gemv(x, q, s, rpw, unroll, pdl)
                torch.cuda.synchronize()
                err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                worst = max(worst, err)
                assert err < 1e-2, (N, K, rpw, unroll, pdl, err)
        for w, u, d in VARIANTS8:
            y = cuda_gemv8(x, q, s, w, u, d)
            torch.cuda.synchronize()
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            worst = max(worst, err)
            assert err < 1e-2, (N, K, "gemv8", w, u, d, err)
    print(f"correct: worst relative error {worst:.1e} over every variant and shape", flush=True)

    L = 32
    shapes = LLAMA2_7B_LINEARS
    H = shapes["o"][1]
    x_in = torch.randn(H, dtype=torch.bfloat16, device=dev)
    qs = {n: [quantize_int8(torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5) for _ in range(L)]
          for n, (N, K) in shapes.items()}
    nbytes = L * sum(N * K for N, K in shapes.values())
    results, lines = [], []

    def chain(kind, call, total=nbytes):
        def fn():
            y = x_in
            for i in range(L):
                for n, (N, K) in shapes.items():
                    y = call(y[:K], *qs[n][i])
            return y
        out = fn().double()
        assert torch.isfinite(out).all(), kind
        t = graph_time(fn, iters=1, replays=20)
        results.append(dict(kind=kind, us_per_layer=t * 1e6 / L, TBps=total / t / 1e12))
        lines.append(f"{kind:36s} {t * 1e6 / L:7.2f} us/layer {total / t / 1e12:5.2f} TB/s")
        print(lines[-1], flush=True)

    chain("triton int8 word GEMV (PDL)", lambda x, q, s: G.gemv(x.view(1, -1), q, scale=s).view(-1))
    for rpw, unroll in VARIANTS[:3]:
        for pdl in (True, False):
            chain(f"cuda rpw={rpw} unroll={unroll}{' PDL' if pdl else ''}",
                  lambda x, q, s, r=rpw, u=unroll, p=pdl: cuda_gemv(x, q, s, r, u, p))
    for w, u, d in VARIANTS8:
        chain(f"cuda8 warps={w} unroll={u}{' dp4a' if d else ' float'} PDL",
              lambda x, q, s, w=w, u=u, d=d: cuda_gemv8(x, q, s, w, u, d))
    for rpw, unroll in VARIANTS[:4]:  # the loads alone: does the per-byte arithmetic limit the stream?
        chain(f"cuda rpw={rpw} unroll={unroll} PDL, no arithmetic",
              lambda x, q, s, r=rpw, u=unroll: cuda_gemv(x, q, s, r, u, True, False))
    chain("triton int8 word GEMV (PDL), again", lambda x, q, s: G.gemv(x.view(1, -1), q, scale=s).view(-1))
    qs.clear()
    torch.cuda.empty_cache()
    ws = {n: [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5 for _ in range(L)]
          for n, (N, K) in shapes.items()}
    qs.update({n: [(w,) for w in v] for n, v in ws.items()})
    chain("triton bf16 GEMV (PDL)", lambda x, w: G.gemv(x.view(1, -1), w).view(-1), 2 * nbytes)
    (out_dir / "cuda_gemv_probe.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "layers": L,
                                                              "worst_rel_err": worst, "results": results}, indent=1))
    print("\n==== summary ====\n" + "\n".join(lines))


if __name__ == "__main__":
    main()

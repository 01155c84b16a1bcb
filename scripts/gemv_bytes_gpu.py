"""Is the 8-bit GEMVs' lower bandwidth their format's or their size's? The batch-1 GEMVs through
their public entry points (autotuned), timed as sweep_gemv.py times them (eight weight copies
rotated, sixteen calls per CUDA graph, PDL on): int8 on the Llama-2-7B shapes, and bf16 on those
shapes and on shapes of the same bytes as int8's (half the columns, or half the rows). If bf16
at int8's bytes reads no faster than int8, the gap is a per-kernel cost that halving the bytes
exposes, not the int8 arithmetic.

Usage: python scripts/gemv_bytes_gpu.py OUTDIR; JSON in OUTDIR.
"""
import json

import torch

from fastllm.bench.common import LLAMA2_7B_LINEARS, graph_time, script_out_dir
from fastllm.kernels import gemv as G
from fastllm.stages.quantizers.int8 import quantize_int8

out_dir = script_out_dir(__doc__)
dev = torch.device("cuda")
rows, lines = [], []


def timed(kind: str, N: int, K: int, layer: str) -> None:
    w = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5 for _ in range(8)]
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    if kind == "int8":
        q = [quantize_int8(t) for t in w]
        del w
        ref = (x.double() @ q[0][0].double().T) * q[0][1].double()
        fn, nbytes = (lambda i: G.gemv(x, q[i % 8][0], scale=q[i % 8][1])), N * K
    else:
        ref = x.double() @ w[0].double().T
        fn, nbytes = (lambda i: G.gemv(x, w[i % 8])), 2 * N * K
    err = ((fn(0).double() - ref).norm() / ref.norm()).item()
    assert err < 2e-2, (kind, N, K, err)
    it = iter(range(10 ** 9))
    t = graph_time(lambda: fn(next(it)))
    rows.append(dict(layer=layer, kind=kind, N=N, K=K, MB=nbytes / 1e6, us=t * 1e6, TBps=nbytes / t / 1e12))
    line = (f"{layer:8s} {kind:5s} [{N:5d}, {K:5d}] {nbytes / 1e6:6.1f} MB {t * 1e6:6.1f} us "
            f"{nbytes / t / 1e12:.2f} TB/s")
    lines.append(line)
    print(line, flush=True)
    torch.cuda.empty_cache()


for name, (N, K) in LLAMA2_7B_LINEARS.items():
    timed("int8", N, K, name)
    timed("bf16", N, K, name)
    timed("bf16", N, K // 2, name + "/2K")
    timed("bf16", N // 2, K, name + "/2N")
(out_dir / "gemv_bytes.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                    indent=1))
print("\n==== summary ====\n" + "\n".join(lines))

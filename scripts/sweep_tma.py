"""Probe: the word GEMVs with TMA-pipelined weights (fastllm.kernels.gemv_tma) against the present
kernels, Llama-2-7B shapes, eight weight copies rotated, graph-timed, PDL on.
Usage: python scripts/sweep_tma.py OUTDIR"""
import json
import sys
from pathlib import Path

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from fastllm.bench.common import graph_time
from fastllm.kernels import gemv as G
from fastllm.kernels import gemv_int4 as G4
from fastllm.kernels.gemv_tma import _gemv_bytes_tma_kernel, _gemv_int4_tma_kernel
from fastllm.kernels.launch import pdl
from fastllm.stages.quantizers.int4 import dequantize_int4, pack_scales, quantize_int4
from fastllm.stages.quantizers.int8 import quantize_int8

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
out_dir.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
I4 = [(bn, bw, w, st) for bn, bw, w in [(8, 64, 1), (16, 64, 1), (8, 64, 2), (16, 64, 2), (16, 128, 2), (16, 128, 4),
                                         (32, 64, 2), (32, 64, 4), (4, 64, 1), (8, 128, 2), (32, 128, 4)]
      for st in (3, 5)]
I8 = [(bn, bk, w, st) for bn, bk, w in [(4, 512, 1), (8, 512, 2), (8, 256, 1), (16, 256, 2), (16, 512, 4), (32, 256, 4),
                                         (8, 1024, 4), (4, 1024, 2), (16, 1024, 8), (32, 512, 8)]
      for st in (3, 5)]
report = {"device": torch.cuda.get_device_name(), "results": []}
lines = []
x = None
for name, (N, K) in SHAPES.items():
    x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
    y = torch.empty(N, device=dev, dtype=torch.bfloat16)
    w = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(8)]
    q8 = [quantize_int8(t) for t in w]
    q4 = [quantize_int4(t, 128) for t in w]
    del w
    torch.cuda.empty_cache()
    pairs = [pack_scales(s, z) for _, s, z in q4]
    Kp = q4[0][0].shape[1] * 2
    ref4 = x.double() @ dequantize_int4(*q4[0], K).double().T
    ref8 = (x.double() @ q8[0][0].double().T) * q8[0][1].double()
    res = {}

    def rot(fn):
        it = iter(range(10 ** 9))
        return graph_time(lambda: fn(next(it) % 8)) * 1e6

    res["int4 now"] = (rot(lambda i: G4.gemv_int4(x, *q4[i], 128, pairs=pairs[i])), "pinned/autotuned")
    res["int8 now"] = (rot(lambda i: G.gemv(x, q8[i][0], scale=q8[i][1])), "autotuned")
    for bn, bw, nw, st in I4:
        wd = [TensorDescriptor.from_tensor(p.view(torch.int32), [bn, bw]) for p, _, _ in q4]
        sd = [TensorDescriptor.from_tensor(pp.view(N, -1), [bn, 2 * bw * 8 // 128]) for pp in pairs]

        def c4(i, bn=bn, bw=bw, nw=nw, st=st, wd=wd, sd=sd):
            _gemv_int4_tma_kernel[(triton.cdiv(N, bn),)](x, wd[i], sd[i], y, y, N, K, Kp, G=128, HAS_BIAS=False,
                                                        ASM=True, BLOCK_N=bn, BLOCK_W=bw, WAIT_IN_LOOP=False,
                                                        STAGES=st, num_warps=nw, **pdl(x))
        try:
            c4(0)
            err = ((y.double() - ref4[0]).norm() / ref4.norm()).item()
            assert err < 2e-2, err
            res[f"int4 tma {bn},{bw},w{nw},s{st}"] = (rot(c4), "")
        except Exception as e:  # noqa: BLE001
            print("int4", bn, bw, nw, st, type(e).__name__, str(e)[:200], flush=True)
    for bn, bk, nw, st in I8:
        wd = [TensorDescriptor.from_tensor(q.view(torch.int32), [bn, bk // 4]) for q, _ in q8]

        def c8(i, bn=bn, bk=bk, nw=nw, st=st, wd=wd):
            _gemv_bytes_tma_kernel[(triton.cdiv(N, bn),)](x, wd[i], y, q8[i][1], N, K, FP8=False, ASM=True,
                                                         BLOCK_N=bn, BLOCK_K=bk, STAGES=st, num_warps=nw, **pdl(x))
        try:
            c8(0)
            err = ((y.double() - ref8[0]).norm() / ref8.norm()).item()
            assert err < 2e-2, err
            res[f"int8 tma {bn},{bk},w{nw},s{st}"] = (rot(c8), "")
        except Exception as e:  # noqa: BLE001
            print("int8", bn, bk, nw, st, type(e).__name__, str(e)[:200], flush=True)
    report["results"].append(dict(shape=name, times=res))
    (out_dir / "sweep_tma.json").write_text(json.dumps(report, indent=1))
    for kind in ("int4", "int8"):
        now = res[f"{kind} now"][0]
        tma = sorted((t, k) for k, (t, _) in res.items() if k.startswith(kind + " tma"))
        nbytes = N * K // 2 + N * K // 128 * 8 if kind == "int4" else N * K
        line = (f"{name:8s} {kind}: now {now:6.1f} us ({nbytes / now / 1e6:.2f} TB/s); tma best {tma[0][0]:6.1f} us "
                f"({nbytes / tma[0][0] / 1e6:.2f} TB/s) [{tma[0][1]}], next {tma[1][0]:.1f} [{tma[1][1]}]")
        lines.append(line)
        print(line, flush=True)

    torch.cuda.empty_cache()
print("\n==== summary ====\n" + "\n".join(lines))

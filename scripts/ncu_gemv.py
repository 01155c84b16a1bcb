"""The batch-1 GEMVs for Nsight Compute: Llama-2-7B's qkv_proj in int8 (the word kernel, and the
TMA kernel in its pinned configuration), fp8, and bf16 at int8's bytes ([12288, 2048]), each
autotuned first, then run once each between cudaProfilerStart / Stop. Run it under
`ncu --clock-control none --profile-from-start off --section ... python scripts/ncu_gemv.py`
to compare where each one's warps stall (scripts/gemv_bytes_gpu.py times them).
"""
import torch

from fastllm.kernels import gemv as G
from fastllm.stages.quantizers.fp8 import quantize_fp8
from fastllm.stages.quantizers.int8 import quantize_int8

dev = torch.device("cuda")
N, K = 12288, 4096
w = torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5
x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
q8, f8 = quantize_int8(w), quantize_fp8(w)
w_half = torch.randn(N, K // 2, device=dev, dtype=torch.bfloat16)
x_half = torch.randn(1, K // 2, device=dev, dtype=torch.bfloat16)
calls = {"int8 words": lambda: G.gemv(x, q8[0], scale=q8[1], tma=False),
         "int8 tma": lambda: G.gemv(x, q8[0], scale=q8[1], tma=True),
         "fp8 words": lambda: G.gemv(x, f8[0], scale=f8[1], tma=False),
         "bf16 [12288, 2048]": lambda: G.gemv(x_half, w_half)}
for fn in calls.values():  # autotune and compile outside the profiled range
    for _ in range(3):
        fn()
torch.cuda.synchronize()
for name, fn in calls.items():
    print(name, flush=True)
torch.cuda.cudart().cudaProfilerStart()
for fn in calls.values():
    fn()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()

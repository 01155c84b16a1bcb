"""The batch-1 GEMVs for Nsight Compute, Llama-2-7B shapes: the CUDA int8 GEMV (fastllm.kernels.cuda_gemv)
on qkv_proj, gate_up_proj (plain, and in its GLU mode: SiLU-and-mul of gate and up rows) and down_proj,
and the bf16 GEMV on gate_up_proj; each run a few times
first (compile, autotune), then once each between cudaProfilerStart / Stop. Run it under
`ncu --clock-control none --profile-from-start off --section ... python scripts/ncu_gemv.py`
to compare where each one's warps stall (the eleventh session ran the Triton GEMVs of that time so).
"""
import torch

from fastllm.kernels import gemv as G
from fastllm.bench.common import LLAMA2_7B_LINEARS
from fastllm.stages.quantizers.int8 import quantize_int8

dev = torch.device("cuda")
torch.manual_seed(0)
layers = {n: LLAMA2_7B_LINEARS[n] for n in ("qkv", "gate_up", "down")}
q8, xs = {}, {}
for n, (N, K) in layers.items():
    q8[n] = quantize_int8(torch.randn(N, K, device=dev, dtype=torch.bfloat16) / K ** 0.5)
    xs[n] = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
w_bf16 = torch.randn(*layers["gate_up"], device=dev, dtype=torch.bfloat16)


def int8(n, glu=False):
    return lambda: G.gemv(xs[n], q8[n][0], scale=q8[n][1], cuda=True, glu=glu)


calls = {f"int8 {n}": int8(n) for n in layers}
calls["int8 gate_up GLU"] = int8("gate_up", glu=True)
calls["bf16 gate_up"] = lambda: G.gemv(xs["gate_up"], w_bf16)
for fn in calls.values():  # compile and autotune outside the profiled range
    for _ in range(3):
        fn()
torch.cuda.synchronize()
for name in calls:
    print(name, flush=True)
torch.cuda.cudart().cudaProfilerStart()
for fn in calls.values():
    fn()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()

"""The two-plane int4 GEMM (fastllm.kernels.w4_planes) against the float64 product of the
activations and the dequantized int4 weight, on odd shapes (interpreted on the CPU, compiled on a GPU)."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton loads (tests/conftest.py does it too)
pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(M, N, K, G, bias, dtype, outlier=100.0):
    from fastllm.stages.quantizers.int4 import dequantize_int4, quantize_int4

    packed, scales, zeros = quantize_int4(torch.randn(N, K), G)
    x = torch.randn(M, K)
    x[:, K // 3] *= outlier  # one channel far larger than the rest, as in LLM activations
    x = x.to(dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    w = dequantize_int4(packed, scales, zeros, K).double()
    ref = x.double() @ w.T + (b.double() if bias else 0)
    # the planes' bound per output (|x - planes| <= max|x| / 64,516, +1% for x / scale's fp32 rounding)
    bound = x.double().abs().amax(dim=1, keepdim=True) / 64516 * 1.01 * w.abs().sum(dim=1)[None, :]
    rounding = ref.abs() * (2 ** -7 if dtype == torch.bfloat16 else 1e-5)  # (interpreter: bf16 truncated)
    return (x, packed, scales, zeros, G, b), ref, bound + rounding + 1e-6


def _config(i, split):
    from fastllm.kernels import w4_planes as P

    c = P.CONFIGS[i]
    return type(c)(dict(c.kwargs, SPLIT_K=split), num_warps=c.num_warps, num_stages=c.num_stages)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K, G, bias", [(17, 37, 200, 64, True), (40, 64, 256, 128, False),
                                              (3, 70, 96, 32, True)])
@pytest.mark.parametrize("cfg, split", [(0, 1), (3, 1), (4, 1), (6, 1), (0, 2), (5, 3)])  # SWAP: 4, 5, 6
def test_w4_planes_matches_float64(dtype, M, N, K, G, bias, cfg, split):
    from fastllm.kernels.w4_planes import w4a16_planes

    (x, packed, scales, zeros, G, b), ref, tol = _case(M, N, K, G, bias, dtype)
    out = w4a16_planes(x.to(DEV), packed.to(DEV), scales.to(DEV), zeros.to(DEV), G, b.to(DEV) if bias else None,
                       config=_config(cfg, split))
    assert out.shape == (M, N) and out.dtype == dtype
    assert ((out.cpu().double() - ref).abs() <= tol).all()


def test_w4_planes_interleaved_scale_views():
    """Int4Linear's scales and zeros are strided views of one interleaved tensor; the kernel reads them."""
    from fastllm.kernels.w4_planes import w4a16_planes
    from fastllm.stages.quantizers.int4 import pack_scales

    (x, packed, scales, zeros, G, b), ref, tol = _case(9, 33, 192, 64, True, torch.float32)
    sz = pack_scales(scales, zeros).to(DEV)
    out = w4a16_planes(x.to(DEV), packed.to(DEV), sz[:, :3, 0], sz[:, :3, 1], G, b.to(DEV), config=_config(2, 2))
    assert ((out.cpu().double() - ref).abs() <= tol).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton tiles on a GPU")
@pytest.mark.parametrize("M", [17, 64, 200])
def test_w4_planes_autotuned_on_llama_shape(M):
    """The autotuned path on a Llama-2-7B o_proj shape (g128): as close to the float64 product as
    cuBLAS' bf16 product of the same dequantized weight."""
    from fastllm.kernels.w4_planes import w4a16_planes
    from fastllm.stages.quantizers.int4 import dequantize_int4, quantize_int4

    packed, scales, zeros = quantize_int4(torch.randn(4096, 4096, device="cuda") / 64, 128)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    w = dequantize_int4(packed, scales, zeros, 4096).double()
    ref = x.double() @ w.T
    cublas = torch.nn.functional.linear(x, w.to(torch.bfloat16))
    out = w4a16_planes(x, packed, scales, zeros, 128)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= 1.2 * ((cublas.double() - ref).norm() / ref.norm()).item(), err

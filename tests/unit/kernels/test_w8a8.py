"""The fused W8A8 GEMM (int8 x int8, scales and bias in the epilogue) against a float64 product of
the same int8 operands, on odd shapes (interpreted on the CPU, compiled on a GPU)."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton loads (tests/conftest.py does it too)
pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def w8a8():
    return importlib.import_module("fastllm.kernels.w8a8")


def _operands(M, N, K, bias, dtype):
    from fastllm.stages.quantizers.int8 import quantize_int8, quantize_int8_rows

    wq, ws = quantize_int8(torch.randn(N, K))
    xq, xs = quantize_int8_rows(torch.randn(M, K, dtype=dtype))
    b = torch.randn(N, dtype=dtype) if bias else None
    ref = (xq.double() @ wq.double().T) * xs.double() * ws.double()[None, :] + (b.double() if bias else 0)
    return (xq, xs, wq, ws, b), ref


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("M, N, K, bias", [(17, 37, 304, True), (40, 129, 256, False), (3, 64, 80, True)])
@pytest.mark.parametrize("cfg", [0, 3, 8])  # tiles that do and do not divide M, N and K
@pytest.mark.parametrize("tma", [False, True])  # pointer loads; TMA (K a multiple of 16 here)
def test_w8a8_matches_float64(w8a8, dtype, tol, M, N, K, bias, cfg, tma):
    ops, ref = _operands(M, N, K, bias, dtype)
    ops = [t.to(DEV) if t is not None else None for t in ops]
    out = w8a8.w8a8_matmul(*ops, dtype, config=w8a8.CONFIGS[cfg], tma=tma)
    assert out.shape == (M, N) and out.dtype == dtype
    # the int32 sums are exact: fp32 output differs from float64 only by the scale products' rounding
    err = ((out.cpu().double() - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, err


def test_w8a8_odd_k_takes_the_pointer_kernel(w8a8):
    """K whose rows are not 16-byte aligned (TMA cannot read them) falls back to pointer loads."""
    ops, ref = _operands(9, 30, 77, True, torch.float32)
    out = w8a8.w8a8_matmul(*[t.to(DEV) if t is not None else None for t in ops], torch.float32,
                           config=w8a8.CONFIGS[0], tma=True)
    assert ((out.cpu().double() - ref).abs().max() / ref.abs().max()).item() < 1e-6


def test_w8a8_rows_are_independent(w8a8):
    """A token's output does not depend on the other tokens of its batch (no row mixing in the
    tiles' clamped loads): rows computed alone equal the same rows computed in a batch."""
    ops, _ = _operands(21, 50, 96, True, torch.bfloat16)
    ops = [t.to(DEV) if t is not None else None for t in ops]
    xq, xs, wq, ws, b = ops
    batch = w8a8.w8a8_matmul(xq, xs, wq, ws, b, torch.bfloat16, config=w8a8.CONFIGS[1])
    alone = w8a8.w8a8_matmul(xq[5:6].contiguous(), xs[5:6], wq, ws, b, torch.bfloat16, config=w8a8.CONFIGS[1])
    assert torch.equal(batch[5:6], alone)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused W8A8 path runs on CUDA")
def test_int8_dynamic_linear_uses_fused_kernel_on_cuda():
    from torch import nn

    from fastllm.stages.quantizers.int8 import Int8Linear, quantize_int8_rows

    lin = Int8Linear(nn.Linear(96, 40, bias=True, device="cuda", dtype=torch.bfloat16), dynamic_activations=True)
    x = torch.randn(33, 96, device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_int8_rows(x)
    ref = (xq.double() @ lin.qweight.double().T) * xs.double() * lin.scale.double()[None, :] + lin.bias.double()
    out = lin(x)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 8e-3

"""The batch-1 GEMV against a float64 matmul, on odd shapes (interpreted on the CPU)."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton loads (tests/conftest.py does it too)
pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: rounding of the output, and the interpreter's fp32->bf16 casts truncate (the GPU rounds
# to nearest): float32 checks the math exactly, bf16 within a few roundings
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def gemv():
    return importlib.import_module("fastllm.kernels.gemv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K, bias", [(37, 300, False), (64, 1024, True), (5, 1100, True), (129, 77, False)])
@pytest.mark.parametrize("cfg", [0, 3, 8, 9, 10])  # rows per program and tile widths that do and do not divide the shape
def test_gemv_matches_float64(gemv, dtype, N, K, bias, cfg):
    w = torch.randn(N, K, dtype=dtype, device=DEV)
    x = torch.randn(1, K, dtype=dtype, device=DEV)
    b = torch.randn(N, dtype=dtype, device=DEV) if bias else None
    out = gemv.gemv(x, w, b, config=gemv.CONFIGS[cfg])
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (1, N) and out.dtype == dtype and not out.isnan().any()
    assert err < TOL[dtype], err


def test_gemv_reads_a_strided_weight_view(gemv):
    full = torch.randn(50, 96, device=DEV)
    w = full[:, :64]  # rows 96 apart: a slice of a fused weight
    x = torch.randn(64, device=DEV)
    out = gemv.gemv(x, w, config=gemv.CONFIGS[1])
    torch.testing.assert_close(out, (x.double() @ w.double().T).float(), rtol=1e-5, atol=1e-4)


def _rms(x, w, eps):  # the model's RMSNorm, rounding as it does
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K", [(37, 300), (64, 1024), (130, 96)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("cfg", [1, 6])
def test_gemv_with_the_rms_norm_before_it(gemv, dtype, N, K, with_residual, cfg):
    cfg = gemv.CONFIGS[cfg]
    w = torch.randn(N, K, dtype=dtype, device=DEV)
    h = torch.randn(1, K, dtype=dtype, device=DEV)
    nw = (1 + 0.3 * torch.randn(K)).to(dtype).to(DEV)
    res = torch.randn(1, K, dtype=dtype, device=DEV) if with_residual else None
    h0, r0 = h.clone(), res.clone() if with_residual else None
    out = gemv.gemv(h, w, norm_weight=nw, eps=1e-5, residual=res, config=cfg)
    stream = h + res if with_residual else h
    if with_residual:
        out, new_res = out
        ulp = 0 if dtype == torch.float32 else 2 ** -7  # one bf16 rounding apart at most
        torch.testing.assert_close(new_res, stream, rtol=ulp, atol=0)
        assert torch.equal(res, r0)  # inputs untouched
    assert torch.equal(h, h0)
    ref = _rms(stream, nw, 1e-5).double() @ w.double().T
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (1, N) and err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K", [(37, 300), (64, 1024)])
def test_gemv_with_silu_and_mul_before_it(gemv, dtype, N, K):
    w = torch.randn(N, K, dtype=dtype, device=DEV)
    gate_up = torch.randn(1, 2 * K, dtype=dtype, device=DEV)
    out = gemv.gemv(gate_up, w, silu_mul=True, config=gemv.CONFIGS[2])
    g, u = gate_up.float().split(K, dim=-1)
    x = (torch.nn.functional.silu(g) * u).to(dtype)
    ref = x.double() @ w.double().T
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (1, N) and err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weights_every_value_with_row_scales(gemv, dtype):
    """int8 rows are widened through the float's bits, not a conversion instruction: every value
    -128..127 must come out exact."""
    N, K = 33, 512
    q = torch.arange(-128, 128, dtype=torch.int16).repeat(N, 2)[:, :K].roll(5, 0)
    q = q[torch.randperm(N)][:, torch.randperm(K)].to(torch.int8).to(DEV)
    scale = torch.rand(N, device=DEV) + 0.01
    x = torch.randn(1, K, dtype=dtype, device=DEV)
    out = gemv.gemv(x, q, scale=scale, config=gemv.CONFIGS[3])
    ref = (x.double() @ q.double().T) * scale.double()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (1, N) and err < TOL[dtype], err

"""Fused Triton ops against the model's torch ops, on odd shapes (interpreted on the CPU)."""
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
def fused():
    return importlib.import_module("fastllm.kernels.fused")


def ref_norm(x, w, eps):
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, N", [(1, 64), (7, 96), (3, 576)])
def test_rms_norm_with_and_without_residual(fused, dtype, T, N):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    x = torch.randn(T, N, dtype=dtype, device=DEV)
    w = (1 + 0.3 * torch.randn(N)).to(dtype).to(DEV)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-6), ref_norm(x, w, 1e-6), rtol=tol, atol=tol)
    res = torch.randn(T, N, dtype=dtype, device=DEV)
    want_res = x + res
    out = fused.rms_norm(x, w, 1e-6, residual=res)
    torch.testing.assert_close(res, want_res, rtol=tol, atol=tol)  # updated in place
    torch.testing.assert_close(out, ref_norm(want_res, w, 1e-6), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_on_a_strided_view(fused, dtype):
    from fastllm.models.llama import apply_rotary

    T, H, KVH, D = 5, 6, 2, 64
    qkv = torch.randn(T, H + 2 * KVH, D, dtype=dtype, device=DEV)
    pos = torch.tensor([0, 3, 17, 250, 1023], device=DEV)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float, device=DEV) / D))
    freqs = pos[:, None].float() * inv[None]
    emb = torch.cat((freqs, freqs), -1)[:, None]
    want = apply_rotary(qkv[:, :H + KVH].float(), emb.cos(), emb.sin())
    untouched = qkv[:, H + KVH:].clone()
    fused.rotary_(qkv[:, :H + KVH], pos, inv)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(qkv[:, :H + KVH].float(), want, rtol=tol, atol=tol)
    assert torch.equal(qkv[:, H + KVH:], untouched)


@pytest.mark.parametrize("T, N", [(1, 37), (4, 1536)])
def test_silu_and_mul(fused, T, N):
    x = torch.randn(T, 2 * N, device=DEV)
    want = torch.nn.functional.silu(x[:, :N]) * x[:, N:]
    torch.testing.assert_close(fused.silu_and_mul(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="e4m3 conversions need a GPU of compute capability 8.9 (Triton's interpreter rounds them wrongly)")
@pytest.mark.parametrize("M, K", [(1, 64), (7, 300), (33, 14336)])
def test_quant_fp8_rows_matches_torch(fused, M, K):
    x = (torch.randn(M, K, device=DEV) * torch.logspace(-3, 2, M, device=DEV)[:, None]).to(torch.bfloat16)
    x[0, :3] = 0  # zeros and a row's maximum stay exact
    q, scale = fused.quant_fp8_rows(x)
    ref_scale = x.float().abs().amax(dim=1, keepdim=True) / 448.0
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    ref_q = (x.float() / ref_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (M, K)
    assert (q.float().abs().amax(dim=1) == 448).all()
    # one e4m3 step apart at most (division rounding on either side of a tie)
    assert ((q.float() - ref_q.float()).abs() <= ref_q.float().abs() / 8 + 2 ** -9).all()


@pytest.mark.parametrize("M, K", [(1, 64), (7, 300), (5, 1536)])
def test_quant_int8_rows_matches_torch(fused, M, K):
    x = (torch.randn(M, K) * torch.logspace(-3, 2, M)[:, None]).to(DEV)
    x[0, :3] = 0
    q, scale = fused.quant_int8_rows(x)
    ref_scale = x.abs().amax(dim=1, keepdim=True) / 127.0
    torch.testing.assert_close(scale, ref_scale, rtol=1e-6, atol=0)
    ref_q = torch.round(x / ref_scale).clamp(-127, 127)
    assert q.dtype == torch.int8 and (q.abs().amax(dim=1) == 127).all()
    assert ((q.float() - ref_q).abs() <= 1).all()  # ties round away from zero here, to even in torch
    assert ((q.float() - ref_q).abs() > 0).float().mean() < 0.01

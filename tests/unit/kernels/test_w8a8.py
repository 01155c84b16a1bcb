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


def _tokens(M, K, dtype, outlier=0.0):
    x = torch.randn(M, K, dtype=torch.float32)
    if outlier:
        x[:, K // 3] *= outlier  # one channel far larger than the rest, as in LLM activations
    if M > 2:
        x[M // 2] = 0  # a zero row keeps a finite scale
    return x.to(dtype)


@pytest.mark.parametrize("M, K", [(1, 16), (19, 300), (64, 1024)])
@pytest.mark.parametrize("outlier", [0.0, 500.0])
def test_int8_planes_within_bound(M, K, outlier):
    """Two planes: the first is quant_int8_rows' q, the residual within max|x| / 64,516 of x."""
    from fastllm.kernels.fused import RESIDUAL_STEPS, quant_int8_planes, quant_int8_rows

    x = _tokens(M, K, torch.bfloat16, outlier).to(DEV)
    q, s = quant_int8_planes(x)
    assert q.shape == (2, M, K) and q.dtype == torch.int8 and s.shape == (M,)
    assert torch.equal(q[0], quant_int8_rows(x)[0]) and q.abs().max() <= 127
    back = s.double()[:, None] * (q[0].double() + q[1].double() / RESIDUAL_STEPS)
    # (+1%: x / scale is rounded to fp32 before its residual is taken, 254 * 2^-24 * 127 of a step)
    bound = x.double().abs().amax(dim=1, keepdim=True) / 64516 * 1.01
    assert ((back - x.double()).abs() <= bound).all()
    assert (q[1].abs() > 64).any()  # the residual plane uses its whole range, not a sliver of it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K, bias", [(17, 37, 304, True), (40, 129, 256, False), (3, 64, 80, True)])
@pytest.mark.parametrize("cfg, split", [(0, 1), (3, 1), (8, 1), (0, 2), (8, 3)])
def test_w8a16_planes_matches_weight_only_float64(w8a8, dtype, M, N, K, bias, cfg, split):
    """Against the float64 product of the unquantized activations and the dequantized weight (also
    with K split over programs): fp32 outputs within the planes' bound (sum_k |w_nk| * max|x_m| /
    64,516 per output), bf16 outputs
    within one bf16 step of that (Triton's interpreter truncates to bf16 where a GPU rounds)."""
    from fastllm.stages.quantizers.int8 import quantize_int8

    wq, ws = quantize_int8(torch.randn(N, K))
    x = _tokens(M, K, dtype, outlier=200.0)
    b = torch.randn(N, dtype=dtype) if bias else None
    w = wq.double() * ws.double()[:, None]
    ref = x.double() @ w.T + (b.double() if bias else 0)
    c = w8a8.CONFIGS[cfg]
    c = type(c)(dict(c.kwargs, SPLIT_K=split), num_warps=c.num_warps, num_stages=c.num_stages)
    out = w8a8.w8a16_planes(x.to(DEV), wq.to(DEV), ws.to(DEV), b.to(DEV) if bias else None, config=c)
    assert out.shape == (M, N) and out.dtype == dtype
    bound = x.double().abs().amax(dim=1, keepdim=True) / 64516 * 1.01 * w.abs().sum(dim=1)[None, :]
    rounding = ref.abs() * (2 ** -7 if dtype == torch.bfloat16 else 1e-6)
    assert ((out.cpu().double() - ref).abs() <= bound + rounding + 1e-9).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton tiles on a GPU")
@pytest.mark.parametrize("M", [16, 64, 200])
def test_w8a16_planes_autotuned_on_llama_shape(w8a8, M):
    """The autotuned path (every tile a candidate) on a Llama-2-7B o_proj shape: as close to the
    float64 weight-only product as cuBLAS' bf16 product of the same dequantized weight is."""
    from fastllm.stages.quantizers.int8 import quantize_int8

    wq, ws = quantize_int8(torch.randn(4096, 4096, device="cuda") / 64)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    w = wq.double() * ws.double()[:, None]
    ref = x.double() @ w.T
    cublas = torch.nn.functional.linear(x, w.to(torch.bfloat16))
    out = w8a8.w8a16_planes(x, wq, ws, None)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err <= 1.2 * ((cublas.double() - ref).norm() / ref.norm()).item(), err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the two-plane path runs on CUDA")
def test_int8_linear_takes_planes_in_its_token_range(monkeypatch):
    """Int8Linear (weight-only) sends PLANES_MIN_TOKENS..PLANES_MAX_TOKENS tokens through the
    two-plane product and fewer / more tokens elsewhere; every path near the float64 product."""
    from torch import nn

    from fastllm.kernels import w8a8
    from fastllm.stages.quantizers import int8 as Q8

    monkeypatch.setattr(Q8, "PLANES_MIN_TOKENS", 4)
    monkeypatch.setattr(Q8, "PLANES_MAX_TOKENS", 40)
    calls = []
    real = w8a8.w8a16_planes
    monkeypatch.setattr(w8a8, "w8a16_planes", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    lin = Q8.Int8Linear(nn.Linear(96, 40, bias=True, device="cuda", dtype=torch.bfloat16))
    w = lin.qweight.double() * lin.scale.double()[:, None]
    for m in (3, 4, 33, 40, 41):
        x = torch.randn(m, 96, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ w.T + lin.bias.double()
        assert ((lin(x).double() - ref).abs().max() / ref.abs().max()).item() < 8e-3
    assert calls == [4, 33, 40]


def test_int8_planes_torch_matches_kernel():
    """int8.quantize_int8_planes' torch arithmetic (CPU) gives the kernel's planes bit for bit."""
    from fastllm.kernels.fused import quant_int8_planes
    from fastllm.stages.quantizers.int8 import quantize_int8_planes

    x = _tokens(23, 333, torch.bfloat16, outlier=300.0)
    q, s = quantize_int8_planes(x)
    qk, sk = quant_int8_planes(x.to(DEV))
    assert torch.equal(q, qk.cpu()) and torch.equal(s, sk.cpu())


def test_w8a16_planes_split_k_same_bits_and_counters_reset(w8a8):
    """Split-K summed in the kernel: the same bits on a second call, and every tile's counter back
    at zero after it (the next product starts from zero)."""
    from fastllm.kernels import qgemm
    from fastllm.stages.quantizers.int8 import quantize_int8

    wq, ws = quantize_int8(torch.randn(70, 1000))
    x = _tokens(20, 1000, torch.float32, outlier=50.0)
    c = w8a8.CONFIGS[0]
    c = type(c)(dict(c.kwargs, SPLIT_K=4), num_warps=c.num_warps, num_stages=c.num_stages)
    args = (x.to(DEV), wq.to(DEV), ws.to(DEV), None)
    first = w8a8.w8a16_planes(*args, config=c)
    assert torch.equal(first, w8a8.w8a16_planes(*args, config=c))
    assert not any(t.any() for t in qgemm._COUNTERS.values())
    ref = x.double() @ (wq.double() * ws.double()[:, None]).T
    assert ((first.cpu().double() - ref).abs().max() / ref.abs().max()).item() < 2e-3  # (a lost split: ~50%)

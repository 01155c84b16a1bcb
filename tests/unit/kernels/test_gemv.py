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


def _q8(kind, N, K):
    """Every int8 value (or every finite e4m3 value), shuffled over an [N, K] weight."""
    if kind == "int8":
        vals = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8)
    else:
        vals = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.float8_e4m3fn)
        vals = vals[vals.float().isfinite()]
    idx = torch.randint(0, len(vals), (N, K))
    idx[0, : len(vals)] = torch.arange(len(vals))[:K]
    return vals[idx].to(DEV)


def _rows_layer(kind, N, K, dtype):
    """(q, per-row scales, bias) of a row-scaled int8 / fp8 layer holding every weight value."""
    return _q8(kind, N, K), torch.rand(N, device=DEV) + 0.01, torch.randn(N, dtype=dtype, device=DEV)


def _silu_mul_input(K, dtype):
    """(gate_up [1, 2K], the layer input silu(gate) * up rounded to dtype as the unfused op rounds it)."""
    h = torch.randn(1, 2 * K, dtype=dtype, device=DEV)
    g, u = h.float().split(K, dim=-1)
    return h, (torch.nn.functional.silu(g) * u).to(dtype)


def _rows_ref(x, q, scale, b):
    return (x.double() @ q.double().T) * scale.double() + b.double()


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("N, K, cfg", [(33, 512, 3), (7, 260, 0), (130, 1100, 8), (64, 4096, 13)])
@pytest.mark.parametrize("fuse", ["none", "silu_mul", "norm", "norm+residual"])
@pytest.mark.parametrize("prefetch", [False, True, "ahead2"])
def test_quantized_rows_read_as_words(gemv, kind, N, K, cfg, fuse, prefetch, monkeypatch):
    """int8 / fp8 weights with K % 4 == 0 go through the word kernel (four values per int32,
    each widened in one instruction on the GPU, by the same values in plain Triton here): every
    weight value, row scales, bias, and each input fusion, against float64; with its inputs
    requested a tile ahead (PREFETCH_X) or not, and with two weight tiles held ahead (AHEAD=2)."""
    monkeypatch.setattr(gemv, "PREFETCH_X", prefetch is True)
    monkeypatch.setattr(gemv, "AHEAD", 2 if prefetch == "ahead2" else 1)
    dtype = torch.bfloat16
    q, scale, b = _rows_layer(kind, N, K, dtype)
    cfg = gemv.CONFIGS[cfg]
    if fuse == "silu_mul":
        h, x = _silu_mul_input(K, dtype)
        out = gemv.gemv(h, q, b, silu_mul=True, scale=scale, config=cfg)
    elif fuse.startswith("norm"):
        h = torch.randn(1, K, dtype=dtype, device=DEV)
        nw = (1 + 0.3 * torch.randn(K)).to(dtype).to(DEV)
        res = torch.randn(1, K, dtype=dtype, device=DEV) if fuse == "norm+residual" else None
        out = gemv.gemv(h, q, b, norm_weight=nw, eps=1e-5, residual=res, scale=scale, config=cfg)
        if res is not None:
            out, new_res = out
            torch.testing.assert_close(new_res, h + res, rtol=2 ** -7, atol=0)
            h = h + res
        x = _rms(h, nw, 1e-5)
    else:
        x = torch.randn(1, K, dtype=dtype, device=DEV)
        out = gemv.gemv(x, q, b, scale=scale, config=cfg)
    ref = _rows_ref(x, q, scale, b)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (1, N) and not out.isnan().any() and err < TOL[dtype], err
    # the row-at-a-time kernel gives the same result to bf16 rounding
    other = gemv.gemv(x, q, b, scale=scale, config=cfg, words=False)
    assert ((other.double() - out.double()).norm() / ref.norm()).item() < TOL[dtype]


def test_int8_words_offset_keeps_precision_on_a_biased_input(gemv):
    """The int8 word kernel accumulates q + 32896 and subtracts 32896 * sum(x): an input with a
    large common part (all positive) must still come out within bf16 rounding."""
    N, K = 16, 4096
    q = _q8("int8", N, K)
    scale = torch.full((N,), 0.01, device=DEV)
    x = (5 + torch.rand(1, K, device=DEV)).to(torch.bfloat16)
    out = gemv.gemv(x, q, scale=scale, config=gemv.CONFIGS[10])
    ref = (x.double() @ q.double().T) * 0.01
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("N, K, cfg", [(33, 512, 3), (7, 260, 0), (130, 1100, 8), (64, 4096, 9)])
@pytest.mark.parametrize("fuse", ["none", "silu_mul"])
def test_quantized_rows_through_tma(gemv, kind, N, K, cfg, fuse):
    """The int8 / fp8 word GEMV with its weights through a tensor descriptor (rows past N and
    columns past K read as zeros), every weight value, row scales, bias and the SiLU fusion,
    against float64."""
    dtype = torch.bfloat16
    q, scale, b = _rows_layer(kind, N, K, dtype)
    cfg = gemv.TMA_CONFIGS[cfg]
    if fuse == "silu_mul":
        h, x = _silu_mul_input(K, dtype)
        out = gemv.gemv(h, q, b, silu_mul=True, scale=scale, config=cfg, tma=True)
    else:
        x = torch.randn(1, K, dtype=dtype, device=DEV)
        out = gemv.gemv(x, q, b, scale=scale, config=cfg, tma=True)
    ref = _rows_ref(x, q, scale, b)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (1, N) and not out.isnan().any() and err < TOL[dtype], err


def test_word_gemv_takes_tma_only_without_a_norm_and_on_hopper(gemv, monkeypatch):
    """The TMA kernel runs only where asked (tma=True, or gemv.TMA, now off) on CUDA devices of
    compute capability 9.0+; a norm in front keeps the register-prefetch word kernel."""
    from fastllm.kernels import launch

    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    assert not launch.tma_supported(x)
    calls = []
    monkeypatch.setattr(gemv, "launch_rows", lambda tuned, kernel, *a, **k: calls.append(kernel))
    q = _q8("int8", 16, 64).cpu()
    scale = torch.ones(16)
    gemv.gemv(x, q, scale=scale)
    gemv.gemv(x, q, scale=scale, tma=True)
    gemv.gemv(x, q, scale=scale, tma=True, norm_weight=torch.ones(64, dtype=torch.bfloat16))
    assert calls == [gemv._gemv_bytes_kernel, gemv._gemv_bytes_tma_kernel, gemv._gemv_bytes_kernel]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programmatic dependent launch runs on CUDA only")
@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("N, K, cfg", [(33, 512, 3), (130, 1100, 8), (64, 4096, 9)])
def test_tma_head_start_depths_match_float64(gemv, monkeypatch, depth, kind, N, K, cfg):
    """Each HEAD_START depth (weights requested before the PDL wait, inputs after it), launched
    right after the kernel that writes the inputs."""
    probe = torch.empty(1, device=DEV)
    if not gemv.pdl(probe)["USE_PDL"] or not gemv.tma_supported(probe):
        pytest.skip("this card has no programmatic dependent launch or no TMA")
    monkeypatch.setattr(gemv, "HEAD_START", depth)
    q, scale, b = _rows_layer(kind, N, K, torch.bfloat16)
    x0 = torch.randn(1, K, dtype=torch.bfloat16, device=DEV)
    x = x0 * 2  # written by the kernel just before the GEMV
    out = gemv.gemv(x, q, b, scale=scale, config=gemv.TMA_CONFIGS[cfg], tma=True)
    ref = _rows_ref(x0 * 2, q, scale, b)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[torch.bfloat16], err

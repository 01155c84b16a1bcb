"""fastllm.kernels.cuda_w4 (int4 weight-only products of a few tokens on mma.sync): which operands
it takes, that its source builds where nvcc is, and on a GPU (compute capability 8.0+) that it
matches float64 on odd shapes through its token tiles and split counts, gives the same bits on
repeat calls, and that Int4Linear routes to it."""
from __future__ import annotations

import os

import pytest
import torch

from fastllm.kernels import cuda_gemv as CG
from fastllm.kernels import cuda_w4 as W4
from fastllm.stages.quantizers.int4 import Int4Linear, dequantize_int4, pack_scales, quantize_int4

gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                         reason="needs a CUDA GPU of compute capability 8.0+")


def _operands(N, K, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    w[:, 3] *= 20  # a wide group beside narrow ones
    packed, scales, zeros = quantize_int4(w, W4.GROUP)
    return (packed.to(device), pack_scales(scales, zeros).to(device),
            dequantize_int4(packed, scales, zeros, K).double().to(device))


def test_fits_only_what_the_kernel_takes():
    packed, pairs, _ = _operands(24, 200)
    x = torch.zeros(5, 200, dtype=torch.bfloat16)
    assert W4.fits(x, packed, pairs, 128)
    assert not W4.fits(x, packed, pairs, 64)  # groups of 128 only
    assert not W4.fits(x.half(), packed, pairs, 128)  # bf16 inputs only
    assert not W4.fits(torch.zeros(5, 196, dtype=torch.bfloat16), packed, pairs, 128)  # K % 8
    assert not W4.fits(torch.zeros(5, 300, dtype=torch.bfloat16), packed, pairs, 128)  # K past the packed columns
    assert not W4.fits(torch.zeros(5, 204, dtype=torch.bfloat16)[:, :200], packed, pairs, 128)  # rows not 16-byte aligned
    assert not W4.fits(x, packed, pairs[:, :1].contiguous(), 128)  # pairs of the wrong shape
    assert not W4.available(x)  # a CPU tensor


def test_default_splits_fill_the_card_and_keep_whole_groups():
    assert W4.default_splits(64, 4096, 4096, 132) == 8  # o_proj: 32 CTAs, 32 groups
    assert W4.default_splits(64, 22016, 4096, 132) == 1  # gate_up: 172 CTAs already
    assert W4.default_splits(64, 4096, 256, 132) == 1  # two groups: nothing to split
    for M, N, Kp in ((1, 8, 128), (200, 12288, 4096), (64, 4096, 11008)):
        s = W4.default_splits(M, N, Kp, 132)
        assert s & (s - 1) == 0 and (s == 1 or Kp // 128 >= 8 * (s // 2))


@pytest.mark.skipif(CG.nvcc() is None, reason="needs nvcc")
@pytest.mark.skipif(os.environ.get("CI") == "true", reason="compiles CUDA for a minute: run it outside CI")
def test_source_builds_into_the_cache(tmp_path):
    lib = CG.build("80", tmp_path, sources=[W4.SOURCE], name="w4mma")
    assert lib.is_file() and lib.name.startswith("w4mma-sm80-")


@gpu
@pytest.mark.parametrize("M", [2, 5, 8, 13, 24, 40, 64, 65, 130])
@pytest.mark.parametrize("N,K", [(24, 128), (136, 200), (300, 1000), (256, 4096)])
@pytest.mark.parametrize("splits,warps,row_tiles", [(1, 8, 1), (3, 4, 2), (8, 8, 2), (2, 4, 1)])
def test_matches_float64(M, N, K, splits, warps, row_tiles):
    dev = torch.device("cuda")
    packed, pairs, w = _operands(N, K, seed=M * 7 + N, device=dev)
    x = torch.randn(M, K, device=dev).to(torch.bfloat16)
    ref = x.double() @ w.T
    y = W4.w4_mma(x, packed, pairs, 128, splits=splits, warps=warps, row_tiles=row_tiles)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 4e-3, err  # bf16's output rounding (2^-9) and fp32 sums: and the weight rounded to bf16
    bf16 = ((x @ w.T.to(torch.bfloat16)).double() - ref).norm() / ref.norm()
    assert err <= 1.5 * bf16.item() + 1e-4  # no worse than cuBLAS on the dequantized weight


@gpu
def test_bias_strided_rows_and_repeat_bits():
    dev = torch.device("cuda")
    packed, pairs, w = _operands(200, 384, device=dev)
    big = torch.randn(37, 392, device=dev).to(torch.bfloat16)
    x = big[:, :384]  # rows 392 apart
    bias = torch.randn(200, device=dev).to(torch.bfloat16)
    ref = x.double() @ w.T + bias.double()
    ys = [W4.w4_mma(x, packed, pairs, 128, bias=bias, splits=3) for _ in range(4)]
    assert ((ys[0].double() - ref).norm() / ref.norm()).item() < 4e-3
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    from fastllm.kernels.qgemm import _counters

    assert int(_counters(dev, 1).abs().sum()) == 0  # every tile's counter back at zero


@gpu
def test_int4_linear_routes_few_tokens_here(monkeypatch):
    dev = torch.device("cuda")
    lin = torch.nn.Linear(512, 264, bias=False)
    layer = Int4Linear(lin, 128).to(dev)
    x = torch.randn(3, 5, 512, device=dev).to(torch.bfloat16)
    assert W4.available(x)  # (its first product runs before the count)
    calls = []
    real = W4.w4_mma
    monkeypatch.setattr(W4, "w4_mma", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    y = layer(x)
    ref = x.double() @ layer.dequantize(torch.float64).T
    assert calls and set(calls) == {(15, 512)}  # (the first call times the kernel's shapes, then runs the pick)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 4e-3

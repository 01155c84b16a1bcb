"""The int4 batch-1 GEMVs (the default kernel and the word kernel) against float64 on the
dequantized weight, odd shapes (interpreted on the CPU; on a GPU the word kernel unpacks with PTX)."""
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
def g4():
    return importlib.import_module("fastllm.kernels.gemv_int4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("N, K, cfg", [(45, 300, 0), (7, 4096, 2), (130, 1000, 4), (64, 11008 // 8, 7)])
@pytest.mark.parametrize("mode", ["rows", "words", "pairs", "rows-views", "tma", "tma-dp4a"])
def test_int4_gemv_matches_float64(g4, dtype, G, N, K, cfg, mode):
    """pairs: the word kernel reading (scale, zero) interleaved, as Int4Linear stores them;
    rows-views: the row kernel reading scales and zeros as views of that storage; tma: the same
    storage through tensor descriptors (rows past N and the padded columns read as zeros);
    tma-dp4a: that kernel in integer arithmetic (16-bit inputs only; fp32 ones keep floats)."""
    from fastllm.stages.quantizers.int4 import dequantize_int4, pack_scales, quantize_int4

    w = torch.randn(N, K, device=DEV) * (1 + torch.rand(N, 1, device=DEV))
    packed, scales, zeros = quantize_int4(w, G)
    packed[0, :8] = torch.arange(0, 256, 33, dtype=torch.uint8, device=DEV)[:8]  # every nibble value appears
    x = torch.randn(1, K, device=DEV).to(dtype)
    b = torch.randn(N, device=DEV).to(dtype)
    words = mode in ("words", "pairs")
    tma = mode.startswith("tma")
    configs = g4.TMA_CONFIGS if tma else g4.WORD_CONFIGS if words else g4.CONFIGS
    pairs = pack_scales(scales, zeros) if mode in ("pairs", "rows-views") or tma else None
    if pairs is not None:
        ng = scales.shape[1]
        scales, zeros = pairs[:, :ng, 0], pairs[:, :ng, 1]
    out = g4.gemv_int4(x, packed, scales, zeros, G, b, config=configs[cfg], words=None if tma else words,
                       pairs=pairs if mode == "pairs" or tma else None, tma=tma, dp4a=mode == "tma-dp4a")
    ref = x.double() @ dequantize_int4(packed, scales, zeros, K).double().T + b.double()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (1, N) and out.dtype == dtype and not out.isnan().any()
    # fp32: the word kernels sum (128 + q) x and subtract (128 + zero) sum(x), which costs a few
    # of fp32's bits (up to ~1e-5 relative over 30 seeds of the 7 x 4096 case)
    assert err < ((3e-5 if mode in ("words", "pairs", "tma", "tma-dp4a") else 1e-5) if dtype == torch.float32
                  else 1e-2), err


@pytest.mark.parametrize("mode", ["rows", "words", "pairs", "tma", "tma-dp4a"])
def test_int4_gemv_every_config_on_a_llama_row_shape(g4, mode):
    """Each configuration (the autotuner may pick any) on K = 4096, G = 128."""
    from fastllm.stages.quantizers.int4 import dequantize_int4, pack_scales, quantize_int4

    N, K = 48, 4096
    packed, scales, zeros = quantize_int4(torch.randn(N, K, device=DEV), 128)
    x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ dequantize_int4(packed, scales, zeros, K).double().T
    words = mode in ("words", "pairs")
    tma = mode.startswith("tma")
    pairs = pack_scales(scales, zeros) if mode == "pairs" or tma else None
    configs = g4._prune_tma(g4.TMA_CONFIGS, dict(G=128)) if tma else g4.WORD_CONFIGS if words else g4.CONFIGS
    assert configs
    for cfg in configs:
        if words and cfg.kwargs["BLOCK_W"] * 8 % 128:
            continue
        out = g4.gemv_int4(x, packed, scales, zeros, 128, config=cfg, words=None if tma else words,
                           pairs=pairs, tma=tma, dp4a=mode == "tma-dp4a")
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (str(cfg), err)
        if mode == "tma-dp4a":  # as close as the float arithmetic, to a few bf16 roundings
            other = g4.gemv_int4(x, packed, scales, zeros, 128, config=cfg, pairs=pairs, tma=True, dp4a=False)
            assert ((out.double() - other.double()).norm() / ref.norm()).item() < 8e-3, str(cfg)


@pytest.mark.parametrize("words", [False, True])
def test_int4_gemv_reads_scales_stored_group_major(g4, words):
    """Scales and zeros may be stored [groups, N] (rows contiguous): the kernel takes strides."""
    from fastllm.stages.quantizers.int4 import dequantize_int4, quantize_int4

    N, K = 40, 640
    packed, scales, zeros = quantize_int4(torch.randn(N, K, device=DEV), 64)
    x = torch.randn(1, K, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ dequantize_int4(packed, scales, zeros, K).double().T
    st, zt = scales.t().contiguous().t(), zeros.t().contiguous().t()
    assert st.stride() == (1, N)
    out = g4.gemv_int4(x, packed, st, zt, 64, config=(g4.WORD_CONFIGS if words else g4.CONFIGS)[3], words=words)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K, G, cfg", [(45, 300, 32, 0), (70, 1000, 128, 5), (33, 11008 // 4, 64, 9)])
@pytest.mark.parametrize("kernel", ["words", "tma", "tma-dp4a"])
def test_int4_gemv_takes_silu_and_mul(g4, dtype, N, K, G, cfg, kernel):
    """silu_mul: the input [gate, up] becomes silu(gate) * up inside the word kernel or the TMA
    kernel (in float or integer arithmetic), rounded to x's dtype as the separate kernel rounds it."""
    from fastllm.stages.quantizers.int4 import dequantize_int4, pack_scales, quantize_int4

    packed, scales, zeros = quantize_int4(torch.randn(N, K, device=DEV), G)
    pairs = pack_scales(scales, zeros)
    gate_up = (torch.randn(1, 2 * K, device=DEV) * 3).to(dtype)
    gate, up = gate_up.double().split(K, dim=-1)
    x = (gate * torch.sigmoid(gate) * up).to(dtype).double()
    ref = x @ dequantize_int4(packed, scales, zeros, K).double().T
    tma = kernel.startswith("tma")
    # the TMA configurations hold at least two groups a tile
    config = g4.TMA_CONFIGS[cfg % 4] if tma else g4.WORD_CONFIGS[cfg]
    if tma and g4._prune_tma([config], dict(G=G)) != [config]:
        config = g4._prune_tma(g4.TMA_CONFIGS, dict(G=G))[0]
    out = g4.gemv_int4(gate_up, packed, pairs[:, :scales.shape[1], 0], pairs[:, :scales.shape[1], 1], G,
                       config=config, words=None if tma else True, pairs=pairs, silu_mul=True, tma=tma,
                       dp4a=kernel == "tma-dp4a")
    assert out.shape == (1, N) and out.dtype == dtype
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_pinned_word_configurations_are_valid_for_their_shapes(g4):
    """Each per-card configuration tiles whole groups and is one the autotuner could pick."""
    tunable = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_W"], c.num_warps) for c in g4.WORD_CONFIGS}
    assert g4.PINNED_WORDS
    for (card, N, Kp, G), (bn, bw, nw) in g4.PINNED_WORDS.items():
        assert Kp % G == 0 and G in (32, 64, 128) and bw * 8 % G == 0 and (bn, bw, nw) in tunable, (card, N, Kp)
    assert g4._pinned(torch.device("cpu"), 12288, 4096, 128) is None  # no card: the autotuner (or interpreter)
    for (card, N, Kp, G), (bn, bw, nw, st) in g4.PINNED_TMA.items():
        cfg = g4.triton.Config({"BLOCK_N": bn, "BLOCK_W": bw, "STAGES": st}, num_warps=nw)
        assert g4._prune_tma([cfg], dict(G=G)) == [cfg] and bn <= 256 and bw <= 256 and st >= 2, (card, N, Kp)
    assert g4._pinned_tma(torch.device("cpu"), 12288, 4096, 128) is None


def test_int4_gemv_through_tma_by_default_only_where_the_card_has_it(g4, monkeypatch):
    """Without a GPU of compute capability 9.0+, the default path is the word kernel; the TMA
    kernel needs the interleaved pairs."""
    from fastllm.kernels import launch

    x = torch.zeros(1, 64)
    assert not launch.tma_supported(x)
    calls = []
    monkeypatch.setattr(g4, "launch_rows", lambda tuned, kernel, *a, **k: calls.append(kernel))
    from fastllm.stages.quantizers.int4 import pack_scales, quantize_int4

    packed, scales, zeros = quantize_int4(torch.randn(8, 64), 32)
    pairs = pack_scales(scales, zeros)
    g4.gemv_int4(x, packed, scales, zeros, 32, pairs=pairs)
    g4.gemv_int4(x, packed, scales, zeros, 32, pairs=pairs, tma=True)
    g4.gemv_int4(torch.zeros(1, 128), packed, scales, zeros, 32, pairs=pairs, tma=True, silu_mul=True)
    g4.gemv_int4(torch.zeros(1, 128), packed, scales, zeros, 32, tma=True, silu_mul=True)  # no pairs
    assert calls == [g4._gemv_int4_words_kernel, g4._gemv_int4_tma_kernel, g4._gemv_int4_tma_kernel,
                     g4._gemv_int4_words_kernel]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="programmatic dependent launch runs on CUDA only")
@pytest.mark.parametrize("depth", [0, 1, 2])
@pytest.mark.parametrize("dp4a", [False, True])
@pytest.mark.parametrize("N, K, cfg", [(45, 300, 0), (64, 4096, 2), (130, 1000, 4)])
def test_int4_tma_head_start_depths_match_float64(g4, monkeypatch, depth, dp4a, N, K, cfg):
    """Each HEAD_START depth of the TMA GEMV (weights requested before the PDL wait, inputs after
    it), launched right after the kernel that writes its input."""
    from fastllm.kernels.launch import pdl, tma_supported
    from fastllm.stages.quantizers.int4 import dequantize_int4, pack_scales, quantize_int4

    probe = torch.empty(1, device=DEV)
    if not pdl(probe)["USE_PDL"] or not tma_supported(probe):
        pytest.skip("this card has no programmatic dependent launch or no TMA")
    monkeypatch.setattr(g4, "HEAD_START", depth)
    w = torch.randn(N, K, device=DEV)
    packed, scales, zeros = quantize_int4(w, 128)
    pairs = pack_scales(scales, zeros)
    ng = scales.shape[1]
    scales, zeros = pairs[:, :ng, 0], pairs[:, :ng, 1]
    x0 = torch.randn(1, K, device=DEV).to(torch.bfloat16)
    x = x0 * 2  # written by the kernel just before the GEMV
    out = g4.gemv_int4(x, packed, scales, zeros, 128, config=g4.TMA_CONFIGS[cfg], pairs=pairs, tma=True, dp4a=dp4a)
    ref = (x0 * 2).double() @ dequantize_int4(packed, scales, zeros, K).double().T
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err

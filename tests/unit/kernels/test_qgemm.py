"""The quantized-weight GEMM (more than one token) against a float64 matmul over the dequantized
weight, on odd shapes (interpreted on the CPU, compiled on a GPU)."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton loads (tests/conftest.py does it too)
pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 on a GPU: tf32x3 products, near fp32 but not bit for bit
TOL = {torch.float32: 1e-4 if DEV == "cuda" else 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def qgemm():
    return importlib.import_module("fastllm.kernels.qgemm")


def _check(out, ref, dtype, shape):
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == shape and out.dtype == dtype and not out.isnan().any()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M, N, K, bias", [(3, 37, 300, True), (17, 64, 130, False), (40, 129, 77, True),
                                           (9, 70, 512, True)])  # the last: every K step whole (EVEN_K)
@pytest.mark.parametrize("cfg", [0, 3, 6, 9])  # both operand orders; tiles that do and do not divide the shape
def test_int8_rows(qgemm, dtype, M, N, K, bias, cfg):
    from fastllm.stages.quantizers.int8 import quantize_int8

    q, s = quantize_int8(torch.randn(N, K))
    x = torch.randn(M, K, dtype=dtype)
    b = torch.randn(N, dtype=dtype) if bias else None
    out = qgemm.qgemm_rows(x.to(DEV), q.to(DEV), s.to(DEV), b.to(DEV) if bias else None, config=qgemm.CONFIGS[cfg])
    ref = x.double() @ (q.double() * s.double()[:, None]).T + (b.double() if bias else 0)
    _check(out.cpu(), ref, dtype, (M, N))


@pytest.mark.parametrize("M, N, K", [(5, 48, 96), (33, 20, 200)])
def test_fp8_rows(qgemm, M, N, K):
    from fastllm.stages.quantizers.fp8 import quantize_fp8

    q, s = quantize_fp8(torch.randn(N, K))
    x = torch.randn(M, K, dtype=torch.bfloat16)
    out = qgemm.qgemm_rows(x.to(DEV), q.to(DEV), s.to(DEV), config=qgemm.CONFIGS[1])
    ref = x.double() @ (q.double() * s.double()[:, None]).T
    _check(out.cpu(), ref, torch.bfloat16, (M, N))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G, K", [(32, 96), (64, 200), (128, 300), (64, 256)])  # K padded in two; whole steps in one
@pytest.mark.parametrize("M, N, cfg", [(2, 45, 0), (19, 70, 3), (5, 33, 7), (40, 70, 9)])
def test_int4(qgemm, dtype, G, K, M, N, cfg):
    from fastllm.stages.quantizers.int4 import dequantize_int4, quantize_int4

    packed, scales, zeros = quantize_int4(torch.randn(N, K), G)
    x = torch.randn(M, K, dtype=dtype)
    b = torch.randn(N, dtype=dtype)
    try:
        out = qgemm.qgemm_int4(x.to(DEV), packed.to(DEV), scales.to(DEV), zeros.to(DEV), G, b.to(DEV),
                               config=qgemm.CONFIGS[cfg])
    except Exception as e:  # a tile too large for this card (fp32): the autotuner skips such configs too
        if type(e).__name__ != "OutOfResources":
            raise
        pytest.skip(f"config {cfg} does not fit this GPU's shared memory in {dtype}")
    w = dequantize_int4(packed, scales, zeros, K).to(dtype).double()  # the weight rounded as the kernel rounds it
    _check(out.cpu(), x.double() @ w.T + b.double(), dtype, (M, N))


def test_int4_scales_as_views_of_the_interleaved_storage(qgemm):
    """Int4Linear keeps (scale, zero) interleaved: the GEMM reads them through strided views."""
    from fastllm.stages.quantizers.int4 import dequantize_int4, pack_scales, quantize_int4

    packed, scales, zeros = quantize_int4(torch.randn(70, 300), 128)
    pairs = pack_scales(scales, zeros).to(DEV)
    s, z = pairs[:, :3, 0], pairs[:, :3, 1]
    assert s.stride() == (8, 2)
    x = torch.randn(19, 300)
    out = qgemm.qgemm_int4(x.to(DEV), packed.to(DEV), s, z, 128, config=qgemm.CONFIGS[3])
    _check(out.cpu(), x.double() @ dequantize_int4(packed, scales, zeros, 300).double().T, torch.float32, (19, 70))


def test_a_strided_input_view(qgemm):
    from fastllm.stages.quantizers.int8 import quantize_int8

    q, s = quantize_int8(torch.randn(24, 64))
    full = torch.randn(6, 100)
    x = full[:, 10:74]  # rows 100 apart
    out = qgemm.qgemm_rows(x.to(DEV), q.to(DEV), s.to(DEV), config=qgemm.CONFIGS[0])
    torch.testing.assert_close(out.cpu().double(), x.double() @ (q.double() * s.double()[:, None]).T,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G, K, N", [(32, 96, 45), (64, 200, 16), (128, 300, 33), (128, 1024, 70)])
def test_int4_dequantized_in_one_pass(qgemm, dtype, G, K, N):
    """The dense weight of the many-token path: each value (q - zero) * scale rounded once to
    dtype, exactly as the torch reference computes it (K padded to the group in two shapes), read
    through Int4Linear's interleaved (scale, zero) views."""
    from fastllm.stages.quantizers.int4 import dequantize_int4, pack_scales, quantize_int4

    packed, scales, zeros = quantize_int4(torch.randn(N, K) * (1 + torch.rand(N, 1)), G)
    packed[0, :8] = torch.arange(0, 256, 33, dtype=torch.uint8)[:8]  # every nibble value appears
    pairs = pack_scales(scales, zeros).to(DEV)
    ng = scales.shape[1]
    out = qgemm.dequantize_int4(packed.to(DEV), pairs[:, :ng, 0], pairs[:, :ng, 1], G, K, dtype)
    ref = dequantize_int4(packed, scales, zeros, K).to(dtype)
    assert out.shape == (N, K) and out.dtype == dtype
    # exact, but for the interpreter's fp32 -> bf16 cast, which truncates (one bf16 step at most)
    exact = DEV == "cuda" or dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, rtol=0 if exact else 2 ** -7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K", [(45, 96), (16, 200), (33, 1028)])
def test_int8_dequantized_in_one_pass(qgemm, dtype, N, K):
    """The dense weight of int8's many-token path: each value q * scale in fp32 rounded once to
    dtype, as the torch reference computes it; every byte value, the sign bit included."""
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    q[0, :256 if K >= 256 else K] = torch.arange(-128, 128, dtype=torch.int32)[:min(256, K)].to(torch.int8)
    s = torch.rand(N) * 0.1 + 1e-3
    out = qgemm.dequantize_rows(q.to(DEV), s.to(DEV), dtype)
    assert out.shape == (N, K) and out.dtype == dtype
    exact = DEV == "cuda" or dtype == torch.float32  # the interpreter's bf16 cast truncates
    torch.testing.assert_close(out.cpu(), (q.float() * s[:, None]).to(dtype), rtol=0 if exact else 2 ** -7, atol=0)


def _with_split(qgemm, cfg: int, split: int):
    c = qgemm.CONFIGS[cfg]
    return qgemm.triton.Config(dict(c.kwargs, SPLIT_K=split), num_warps=c.num_warps, num_stages=c.num_stages)


@pytest.mark.parametrize("split", [2, 3, 4])
@pytest.mark.parametrize("cfg", [0, 6])  # a plain tile and a SWAP one
def test_split_k(qgemm, cfg, split):
    """K split over programs whose fp32 partial sums the tile's last program adds, with the bias,
    then rounds: the same products as one program per tile, for int8 rows (K = 5 steps of 128 over
    2-4 splits, so some splits are short or empty) and int4 (K padded to its group). The same bits
    on a second call, and the counters back at zero after each."""
    from fastllm.stages.quantizers.int4 import dequantize_int4, quantize_int4
    from fastllm.stages.quantizers.int8 import quantize_int8

    M, N, K = 5, 37, 600
    x, b = torch.randn(M, K), torch.randn(N)
    q, s = quantize_int8(torch.randn(N, K))
    out = qgemm.qgemm_rows(x.to(DEV), q.to(DEV), s.to(DEV), b.to(DEV), config=_with_split(qgemm, cfg, split))
    _check(out.cpu(), x.double() @ (q.double() * s.double()[:, None]).T + b.double(), torch.float32, (M, N))
    again = qgemm.qgemm_rows(x.to(DEV), q.to(DEV), s.to(DEV), b.to(DEV), config=_with_split(qgemm, cfg, split))
    assert torch.equal(again, out)
    assert all(not c.any() for c in qgemm._COUNTERS.values())
    packed, scales, zeros = quantize_int4(torch.randn(N, 300), 64)
    x4 = torch.randn(M, 300)
    out = qgemm.qgemm_int4(x4.to(DEV), packed.to(DEV), scales.to(DEV), zeros.to(DEV), 64,
                           config=_with_split(qgemm, cfg, split))
    _check(out.cpu(), x4.double() @ dequantize_int4(packed, scales, zeros, 300).double().T, torch.float32, (M, N))


def test_split_k_choice(qgemm, monkeypatch):
    """About two programs per SM, at least four K steps per split, none above the token limit."""
    monkeypatch.setattr(qgemm, "_sms", lambda: 132)
    assert qgemm._split_k(64, 4096, 4096, 64, 128, 128) == 8  # 32 tiles -> 256 programs
    assert qgemm._split_k(64, 12288, 4096, 64, 128, 128) == 2  # 96 tiles -> 192
    assert qgemm._split_k(64, 22016, 4096, 64, 128, 128) == 1  # 172 tiles: enough
    assert qgemm._split_k(16, 4096, 512, 16, 64, 128) == 1  # 4 K steps: nothing to split
    assert qgemm._split_k(512, 4096, 4096, 64, 128, 128) == 1  # above SPLIT_K_MAX_TOKENS
    # the autotuner's candidates (and _launch's test for a partial-sum buffer) carry their split
    pruned = qgemm._prune(qgemm.CONFIGS, dict(G=1, INT4=False, M_BUCKET=64, N=4096, Kw=4096))
    assert all(c.kwargs["BLOCK_M"] <= 64 for c in pruned) and max(c.kwargs["SPLIT_K"] for c in pruned) > 1
    assert {c.kwargs["SPLIT_K"] for c in qgemm._prune(qgemm.CONFIGS, dict(G=128, INT4=True, M_BUCKET=1024,
                                                                              N=4096, Kw=4096))} == {1}
    assert qgemm._max_split.__wrapped__(64, 4096, 4096, False, 1, 256) == 16  # 64 x 256 tiles: 16 -> 256 programs
    assert qgemm._max_split.__wrapped__(1024, 4096, 4096, True, 128, 256) == 1
    assert qgemm._max_split.__wrapped__(64, 4096, 4096, False, 1, 0) == 1  # split-K off (SPLIT_K_MAX_TOKENS = 0)


def test_int4_last_tile_reads_no_group_past_the_weight(qgemm):
    """K = 5 groups of 32 with 128-wide tiles: the second tile covers groups 4-7, of which only 4
    exists. The scales and zeros are views into wider storage holding NaN past group 4, so a read
    past the weight's groups would show in the output."""
    from fastllm.stages.quantizers.int4 import dequantize_int4, quantize_int4

    packed, scales, zeros = quantize_int4(torch.randn(9, 160), 32)
    wide = torch.full((2, 9, 8), float("nan"))
    wide[0, :, :5], wide[1, :, :5] = scales, zeros
    x = torch.randn(3, 160)
    cfg = next(i for i, c in enumerate(qgemm.CONFIGS) if c.kwargs["BLOCK_K"] == 128 and c.kwargs["BLOCK_M"] == 16)
    out = qgemm.qgemm_int4(x.to(DEV), packed.to(DEV), wide[0, :, :5].to(DEV), wide[1, :, :5].to(DEV), 32,
                           config=qgemm.CONFIGS[cfg])
    _check(out.cpu(), x.double() @ dequantize_int4(packed, scales, zeros, 160).double().T, torch.float32, (3, 9))


@pytest.mark.skipif(DEV != "cuda", reason="many programs at once need a GPU")
@pytest.mark.parametrize("M, N, K", [(64, 4096, 4096), (37, 1000, 3000)])
def test_split_k_many_programs(qgemm, M, N, K):
    """Hundreds of programs meeting on their tiles' counters at once, through the autotuner's pick
    and each split-K tile: right against float64, the same bits on every call, counters back at zero."""
    from fastllm.stages.quantizers.int8 import quantize_int8

    q, s = (t.to(DEV) for t in quantize_int8(torch.randn(N, K)))
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ (q.double() * s.double()[:, None]).T
    configs = [c for c in qgemm._prune(qgemm.CONFIGS, dict(G=1, INT4=False, M_BUCKET=qgemm.triton.next_power_of_2(M), N=N, Kw=K))
               if c.kwargs["SPLIT_K"] > 1]
    assert configs
    for cfg in [None, *configs]:
        first = qgemm.qgemm_rows(x, q, s, config=cfg)
        _check(first, ref, torch.bfloat16, (M, N))
        for _ in range(5):
            assert torch.equal(qgemm.qgemm_rows(x, q, s, config=cfg), first)
    torch.cuda.synchronize()
    assert all(not c.any() for c in qgemm._COUNTERS.values())

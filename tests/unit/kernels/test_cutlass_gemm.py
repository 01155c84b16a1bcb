"""fastllm.kernels.cutlass_gemm (CUTLASS's weight-only int8 and int4 GEMMs on Hopper): which
operands they take, where it finds CUTLASS, that its sources build where nvcc and CUTLASS are
(slow: minutes), and on an H100 / H200 that every tile matches float64 on odd shapes and that
Int8Linear and Int4Linear route to it."""
from __future__ import annotations

import os

import pytest
import torch

from fastllm.kernels import cuda_gemv as CG
from fastllm.kernels import cutlass_gemm as C

hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                            reason="needs a Hopper GPU (compute capability 9.0)")


def test_fits_only_what_the_kernel_takes():
    q = torch.zeros(24, 64, dtype=torch.int8)
    x = torch.zeros(5, 64, dtype=torch.bfloat16)
    assert C.fits(x, q)
    assert not C.fits(x.half(), q)  # bf16 inputs only
    assert not C.fits(x, q.view(torch.float8_e4m3fn))  # int8 weights only
    assert not C.fits(x[:, :56], q[:, :56])  # strided rows
    assert not C.fits(torch.zeros(5, 40, dtype=torch.bfloat16), torch.zeros(24, 40, dtype=torch.int8))  # K % 16
    assert not C.fits(x, torch.zeros(20, 64, dtype=torch.int8))  # N % 8
    assert not C.fits(x.view(-1)[1:].as_strided((4, 64), (64, 1)), q)  # off a 16-byte boundary
    assert not C.available(x)  # a CPU tensor


def test_cutlass_path_names_the_headers(monkeypatch, tmp_path):
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))
    assert C.cutlass_include() is None  # no include/cutlass there
    for d in ("include/cutlass", "tools/util/include/cutlass"):
        (tmp_path / d).mkdir(parents=True)
    assert C.cutlass_include() == [tmp_path / "include", tmp_path / "tools" / "util" / "include"]
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="no CUTLASS headers"):
        C.build(tmp_path)


def test_the_environment_can_turn_it_off(monkeypatch):
    monkeypatch.setenv("FASTLLM_CUDA_KERNELS", "0")
    C._entry.cache_clear()
    try:
        assert C._entry(0) is None  # (before asking the device anything)
    finally:
        C._entry.cache_clear()


@pytest.mark.slow
@pytest.mark.skipif(CG.nvcc() is None or C.cutlass_include() is None, reason="needs nvcc and CUTLASS's headers")
@pytest.mark.skipif(os.environ.get("CI") == "true", reason="compiles CUTLASS for minutes: run it outside CI")
def test_source_builds_into_the_cache(tmp_path):
    lib = C.build(tmp_path)
    assert lib.is_file() and lib.parent == tmp_path / "cuda" and lib.name.startswith("cutlass") and "-sm90a-" in lib.name
    assert C.build(tmp_path) == lib  # found, not rebuilt


def _operands(M, N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, generator=g) * 0.02 + 1e-4
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    return x.cuda(), q.cuda(), s.cuda()


def test_int4_fits_and_operands():
    from fastllm.stages.quantizers.int4 import quantize_int4

    packed, scales, zeros = quantize_int4(torch.randn(24, 256), 128)
    x = torch.zeros(3, 256, dtype=torch.bfloat16)
    assert C.fits_int4(x, packed, 128) and C.fits_int4(x, packed, 64)
    assert not C.fits_int4(x, packed, 32)  # groups narrower than the GEMM's K step
    assert not C.fits_int4(x[:, :200], packed, 128)  # K padded up to the group
    assert not C.fits_int4(x.half(), packed, 128)
    assert not C.fits_int4(torch.zeros(3, 256, dtype=torch.bfloat16), packed[:20], 128)  # N % 8
    s, z = C.int4_operands(scales, zeros)
    assert s.shape == z.shape == (2, 24) and s.dtype == z.dtype == torch.bfloat16 and s.is_contiguous()
    # the GEMM's scale * q + z is (q - zero) * scale
    q = torch.tensor(7.0)
    assert torch.allclose(s.float()[1, 5] * q + z.float()[1, 5], (q - zeros[5, 1]) * scales[5, 1], rtol=2e-2, atol=1e-2)


@hopper
@pytest.mark.parametrize("M,N,K", [(1, 8, 16), (37, 136, 272), (300, 1000, 1040), (129, 264, 4096), (2050, 520, 176)])
def test_every_int8_tile_matches_float64(M, N, K):
    assert C.available(torch.zeros(1, device="cuda"))
    x, q, s = _operands(M, N, K)
    ref = (x.double() @ q.double().T) * s.double()
    for tile in range(C._entry(0).configs):
        y = C._int8(x, q, s, tile).double()
        # one bf16 rounding of each output: within 2^-8 of it, plus a little for fp32 sums
        assert ((y - ref).abs() <= ref.abs() * 2 ** -8 + 1e-4 * ref.abs().max()).all(), tile


@hopper
@pytest.mark.parametrize("M,N,K,G", [(1, 8, 128, 64), (37, 136, 384, 128), (300, 1000, 1024, 64), (2050, 520, 4096, 128)])
def test_every_int4_tile_matches_float64(M, N, K, G):
    from fastllm.stages.quantizers.int4 import dequantize_int4, quantize_int4

    assert C.available(torch.zeros(1, device="cuda"))
    g = torch.Generator().manual_seed(1)
    packed, scales, zeros = (t.cuda() for t in quantize_int4(torch.randn(N, K, generator=g), G))
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).cuda()
    ref = x.double() @ dequantize_int4(packed, scales, zeros, K).double().T
    ops = C.int4_operands(scales, zeros)
    for tile in range(C._entry(0).int4.configs):
        y = C._int4(x, packed, scales, zeros, G, ops, tile).double()
        # bf16 group operands (scale and -zero * scale, each rounded once) and one rounding of y
        assert ((y - ref).norm(dim=1) <= 1e-2 * ref.norm(dim=1)).all(), tile


def _spy(monkeypatch, name):
    calls = []
    run = getattr(C, name)
    monkeypatch.setattr(C, name, lambda *a, **k: calls.append(a[-1]) or run(*a, **k))
    return calls


@hopper
def test_int8_linear_takes_it_from_128_tokens(monkeypatch):
    from fastllm.stages.quantizers.int8 import Int8Linear

    layer = Int8Linear(torch.nn.Linear(512, 264, bias=False, dtype=torch.bfloat16, device="cuda"))
    calls = _spy(monkeypatch, "_int8")
    for M in (127, 128, 700):
        x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
        ref = (x.double() @ layer.qweight.double().T) * layer.scale.double()
        y = layer(x).double()
        assert ((y - ref).abs() <= ref.abs() * 2 ** -7 + 1e-3 * ref.abs().max()).all(), M
        assert bool(calls) == (M >= 128), M  # (the pick among the candidates timed on the first call)
        calls.clear()


@hopper
def test_int4_linear_takes_it_from_128_tokens(monkeypatch):
    from fastllm.stages.quantizers.int4 import Int4Linear

    layer = Int4Linear(torch.nn.Linear(512, 264, bias=False, dtype=torch.bfloat16, device="cuda"), 128)
    calls = _spy(monkeypatch, "_int4")
    for M in (127, 128, 700):
        x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
        ref = x.double() @ layer.dequantize(torch.float64).T
        y = layer(x).double()
        assert ((y - ref).norm(dim=1) <= 1e-2 * ref.norm(dim=1)).all(), M
        assert bool(calls) == (M >= 128), M
        calls.clear()


@hopper
@pytest.mark.parametrize("graph_timing", [False, True])
def test_the_pick_is_a_candidate_and_matches(monkeypatch, graph_timing):
    monkeypatch.setattr(C, "GRAPH_TIMING", graph_timing)
    monkeypatch.setattr(C, "_picks", {})
    x, q, s = _operands(300, 520, 1040)
    y = C.w8a16(x, q, s).double()
    (key, pick), = C._picks.items()
    assert key[0] == "int8" and key[2:] == (512, 520, 1040)
    assert pick in (C.TRITON, C.DENSE, *range(C._entry(0).configs))
    ref = (x.double() @ q.double().T) * s.double()
    assert ((y - ref).abs() <= ref.abs() * 2 ** -7 + 1e-3 * ref.abs().max()).all()

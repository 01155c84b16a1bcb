"""fastllm's CUDA int8 GEMV (fastllm.kernels.cuda_gemv): its source builds with nvcc where there is
one; on a GPU it matches float64 on odd shapes, with bias and SiLU-and-mul inputs, under PDL in a
CUDA graph, and fastllm.kernels.gemv routes int8 GEMVs to it."""
from __future__ import annotations

import pytest
import torch

from fastllm.kernels import cuda_gemv as CG

needs_nvcc = pytest.mark.skipif(CG.nvcc() is None, reason="no nvcc on this machine")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_nvcc
@pytest.mark.parametrize("arch", ["90", "80"])
def test_source_builds_once_into_the_cache(tmp_path, arch):
    lib = CG.build(arch, tmp_path)
    assert lib.is_file() and lib.parent == tmp_path / "cuda" and f"sm{arch}" in lib.name
    before = lib.stat().st_mtime_ns
    assert CG.build(arch, tmp_path) == lib and lib.stat().st_mtime_ns == before  # loaded, not rebuilt
    assert not list((tmp_path / "cuda").glob("*.tmp"))


@needs_nvcc
def test_a_failed_build_says_why_and_leaves_nothing(monkeypatch, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.cu").write_text("extern \"C\" int ok() { return 0; }\n")
    (src / "bad.cu").write_text("this is not C++;\n")
    monkeypatch.setattr(CG, "SOURCE_DIR", src)
    monkeypatch.setattr(CG, "SOURCES", [src / "good.cu", src / "bad.cu"])
    with pytest.raises(RuntimeError, match="nvcc failed(.|\n)*bad.cu"):
        CG.build("80", tmp_path)
    assert list((tmp_path / "cuda").iterdir()) == []  # no library, no objects, no temporary file


def test_without_nvcc_the_build_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(CG, "nvcc", lambda: None)
    with pytest.raises(RuntimeError, match="no nvcc"):
        CG.build("90", tmp_path)


def test_the_environment_can_turn_it_off(monkeypatch):
    monkeypatch.setenv("FASTLLM_CUDA_KERNELS", "0")
    CG._entry.cache_clear()
    try:
        assert CG._entry(0) is None  # (before asking the device anything)
    finally:
        CG._entry.cache_clear()


def test_fits_only_what_the_kernel_takes():
    q = torch.zeros(8, 32, dtype=torch.int8)
    x = torch.zeros(32, dtype=torch.bfloat16)
    assert CG.fits(x, q) and CG.fits(torch.zeros(64, dtype=torch.bfloat16), q, silu_mul=True)
    assert not CG.fits(x.half(), q)  # bf16 inputs only
    assert not CG.fits(x[:24], q[:, :24])  # K % 16
    assert CG.fits(x, q.view(torch.float8_e4m3fn)) and not CG.fits(x, q.view(torch.float8_e5m2))  # int8, e4m3
    assert not CG.fits(torch.zeros(16, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.int8)[:, :16])  # strided
    assert not CG.available(x)  # a CPU tensor
    with pytest.raises(ValueError, match="int8"):
        CG.gemv_int8(x.half(), q, torch.ones(8))


@gpu
def test_fp8_weights_need_compute_capability_8_9(monkeypatch):
    # the library's fp8 kernels are empty below 8.9 (no e4m3 conversion there), so they must never run
    q = torch.zeros(8, 32, dtype=torch.int8, device="cuda")
    x = torch.zeros(32, dtype=torch.bfloat16, device="cuda")
    monkeypatch.setattr(CG, "_capability", lambda index: (8, 0))
    assert CG.fits(x, q) and not CG.fits(x, q.view(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="8.9"):
        CG.gemv_int8(x, q.view(torch.float8_e4m3fn), torch.ones(8, device="cuda"))


def _layer(N, K, seed=0):
    """Every int8 value shuffled over [N, K], row scales, bias."""
    g = torch.Generator().manual_seed(seed)
    q = torch.arange(-128, 128, dtype=torch.int16).repeat(N, K // 256 + 1)[:, :K]
    q = q.flatten()[torch.randperm(N * K, generator=g)].view(N, K).to(torch.int8)
    return q.cuda(), (torch.rand(N, generator=g) + 0.01).cuda(), torch.randn(N, generator=g).to(torch.bfloat16).cuda()


def _chunk_fixed_point(x: torch.Tensor) -> torch.Tensor:
    """x (float64 [K]) as the kernel rounds it: 16-bit fixed point per chunk of 16 against its largest."""
    c = x.view(-1, 16)
    sc = c.abs().amax(dim=1, keepdim=True) / 32767
    sc = torch.where(sc > 0, sc.float().double(), torch.ones_like(sc))
    return (torch.round(c / sc).clamp(-32767, 32767) * sc).view(-1)


@gpu
@pytest.mark.parametrize("N, K", [(1, 16), (37, 528), (129, 4096), (301, 11008), (8, 8208)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("silu", [False, True])
# persist: a persistent grid of that many CTAs (the SM count taken as 1, so that each warp streams
# several rows even at these sizes); 0: a CTA per `warps` rows
@pytest.mark.parametrize("warps, persist", [(8, 0), (16, 0), (16, 3), (8, 1)])
def test_matches_float64(N, K, bias, silu, warps, persist, monkeypatch):
    monkeypatch.setattr(CG, "WARPS", warps)
    monkeypatch.setattr(CG, "PERSIST", persist)
    monkeypatch.setattr(CG, "_sms", lambda index: 1)
    x0 = torch.randn(1, K).to(torch.bfloat16).cuda()
    if not CG.available(x0):
        pytest.skip("the CUDA GEMV does not build here")
    q, s, b = _layer(N, K)
    if silu:
        h = torch.randn(1, 2 * K).to(torch.bfloat16).cuda()
        g, u = h.float().split(K, dim=-1)
        x = (torch.nn.functional.silu(g) * u).to(torch.bfloat16)  # as the unfused op rounds it
    else:
        h = x = x0
    x[0, 3] = 40.0 if not silu else x[0, 3]  # one large input: its chunk's neighbours keep their precision
    out = CG.gemv_int8(h, q, s, b if bias else None, silu_mul=silu)
    xd = x.double().view(-1)
    ref = (q.double() @ xd) * s.double() + (b.double() if bias else 0)
    rounded = (q.double() @ _chunk_fixed_point(xd)) * s.double() + (b.double() if bias else 0)
    assert out.shape == (N,) and out.dtype == torch.bfloat16 and not out.isnan().any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    # what is left after the inputs' fixed-point rounding is the bf16 output's rounding
    assert ((out.double() - rounded).abs() <= rounded.abs() * 2 ** -8 + 1e-3 * ref.abs().max()).all()


@gpu
def test_gemv_routes_int8_to_it_and_agrees_with_the_triton_kernel():
    from fastllm.kernels import gemv as G

    q, s, b = _layer(300, 4096, seed=1)
    x = torch.randn(1, 4096).to(torch.bfloat16).cuda()
    if not CG.available(x):
        pytest.skip("the CUDA GEMV does not build here")
    cuda, triton_ = G.gemv(x, q, b, scale=s), G.gemv(x, q, b, scale=s, cuda=False)
    ref = (x.double() @ q.double().T) * s.double() + b.double()
    assert cuda.shape == triton_.shape == (1, 300)
    assert ((cuda.double() - triton_.double()).norm() / ref.norm()).item() < 1e-2
    # with the RMSNorm before it (and a residual) too
    nw = (torch.rand(4096) + 0.5).to(torch.bfloat16).cuda()
    r = torch.randn(1, 4096).to(torch.bfloat16).cuda()
    (yc, hc), (yt, ht) = (G.gemv(x, q, b, scale=s, norm_weight=nw, residual=r, eps=1e-5, cuda=c) for c in (True, False))
    assert yc.shape == yt.shape == (1, 300) and hc.shape == ht.shape == (1, 4096) and torch.equal(hc, ht)
    assert ((yc.double() - yt.double()).norm() / yt.double().norm()).item() < 1e-2


@gpu
@pytest.mark.parametrize("N, K", [(1, 16), (37, 528), (129, 4096), (301, 11008), (8, 8208)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["plain", "silu", "norm"])
@pytest.mark.parametrize("persist", [0, 2])
def test_fp8_matches_float64(N, K, bias, mode, persist, monkeypatch):
    """float8 e4m3 weights through the CUDA GEMV's fp8 form: within its f16 sums' rounding (2^-11
    per step, at most eight steps per f16 lane and chunk) of float64, and close to the Triton fp8 GEMV."""
    from fastllm.kernels import gemv as G
    from fastllm.stages.quantizers.fp8 import quantize_fp8

    monkeypatch.setattr(CG, "PERSIST", persist)
    monkeypatch.setattr(CG, "_sms", lambda index: 1)
    g = torch.Generator().manual_seed(N + K)
    h = torch.randn(1, 2 * K if mode == "silu" else K, generator=g).to(torch.bfloat16).cuda()
    if not CG.available(h) or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the CUDA GEMV does not build here, or the card has no fp8")
    h[0, 5] = 30.0  # one large input: its chunk's neighbours keep their precision
    q, s = quantize_fp8(torch.randn(N, K, generator=g).cuda())
    b = torch.randn(N, generator=g).to(torch.bfloat16).cuda() if bias else None
    w = (torch.rand(K, generator=g) + 0.5).to(torch.bfloat16).cuda()
    kw = dict(norm_weight=w, eps=1e-5) if mode == "norm" else dict(silu_mul=mode == "silu")
    out = CG.gemv_int8(h, q, s, b, **kw)
    if mode == "silu":
        gate, up = h.float().split(K, dim=-1)
        x = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)
    elif mode == "norm":
        x = _rms_norm_ref(h.view(-1), w, 1e-5)[0]
    else:
        x = h
    xd, qd = x.double().view(-1), q.double()
    ref = (qd @ xd) * s.double() + (b.double() if bias else 0)
    spread = (qd.abs() @ xd.abs()) * s.double()  # what the f16 sums' rounding is relative to
    assert out.shape == (N,) and out.dtype == torch.bfloat16 and not out.isnan().any()
    assert ((out.double() - ref).abs() <= ref.abs() * 2 ** -8 + spread * 2 ** -8 + 1e-6).all()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 5e-3
    if mode != "norm":  # the Triton fp8 GEMV, through gemv
        tri = G.gemv(h, q, b, scale=s, silu_mul=mode == "silu", cuda=False)
        via = G.gemv(h, q, b, scale=s, silu_mul=mode == "silu", cuda=True)
        assert torch.equal(via.view(-1), out)
        assert ((out.double() - tri.double().view(-1)).norm() / ref.norm()).item() < 1e-2


@gpu
@pytest.mark.parametrize("I, K", [(1, 16), (37, 528), (129, 4096), (64, 2064)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("warps, persist", [(16, 0), (8, 0), (16, 3)])
def test_glu_matches_the_layer_then_silu_and_mul(I, K, bias, fp8, warps, persist, monkeypatch):
    """gate_up_proj's [2I, K] weight with SiLU-and-mul in the GEMV (each warp sums gate row n and up
    row I + n; K's chunks of 16 need not fill a warp's batches) against the GEMV's [2I] output then
    silu(gate) * up in float, rounded to bf16 as the unfused ops round it, and against float64."""
    from fastllm.kernels import gemv as G
    from fastllm.kernels.fused import silu_and_mul
    from fastllm.stages.quantizers.fp8 import quantize_fp8

    monkeypatch.setattr(CG, "WARPS", warps)
    monkeypatch.setattr(CG, "PERSIST", persist)
    monkeypatch.setattr(CG, "_sms", lambda index: 1)
    gen = torch.Generator().manual_seed(I * K)
    x = torch.randn(1, K, generator=gen).to(torch.bfloat16).cuda()
    if not CG.available(x) or fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the CUDA GEMV does not build here, or the card has no fp8")
    if fp8:
        q, s = quantize_fp8(torch.randn(2 * I, K, generator=gen).cuda())
    else:
        q, s, _ = _layer(2 * I, K, seed=I + K)
        s = s / 64
    b = torch.randn(2 * I, generator=gen).to(torch.bfloat16).cuda() if bias else None
    act = CG.gemv_int8(x, q, s, b, glu=True)
    assert act.shape == (I,) and act.dtype == torch.bfloat16 and not act.isnan().any()
    gate_up = CG.gemv_int8(x, q, s, b)  # the layer alone, [2I]
    unfused = silu_and_mul(gate_up.view(1, -1)).view(-1)
    g, u = gate_up.double().split(I)
    near = torch.nn.functional.silu(g) * u
    # the same sums but for their lanes' order: within a bf16 rounding or two of the unfused path
    assert ((act.double() - unfused.double()).abs() <= near.abs() * 2 ** -6 + 1e-6).all()
    qd = q.double() * s.double()[:, None]
    ref = qd @ x.double().view(-1) + (b.double() if bias else 0)
    ref = torch.nn.functional.silu(ref[:I]) * ref[I:]
    assert ((act.double() - ref).norm() / ref.norm()).item() < 2e-2
    monkeypatch.setattr(G, "CUDA_FP8", True)
    assert G.glu_fits(x, q) and torch.equal(G.gemv(x, q, b, scale=s, glu=True).view(-1), act)
    monkeypatch.setattr(G, "GLU", False)
    assert not G.glu_fits(x, q)


def test_glu_needs_the_cuda_gemv():
    from fastllm.kernels import gemv as G

    q = torch.zeros(8, 32, dtype=torch.int8)
    x = torch.zeros(1, 32, dtype=torch.bfloat16)
    assert CG.fits(x, q, glu=True) and not CG.fits(x, q[:7], glu=True)  # gate and up rows: an even count
    assert not G.glu_fits(x, q)  # a CPU tensor
    with pytest.raises(ValueError, match="glu"):
        G.gemv(x, q, scale=torch.ones(8), glu=True)


def _rms_norm_ref(h, w, eps, r=None):
    """fastllm.kernels.fused.rms_norm's rounding, in torch: (bf16 input of the GEMV, bf16(h + r))."""
    v = h if r is None else (h.float() + r.float()).to(torch.bfloat16)
    rs = torch.rsqrt(v.float().pow(2).mean() + eps)
    return (w.float() * (v.float() * rs).to(torch.bfloat16).float()).to(torch.bfloat16), v


@gpu
@pytest.mark.parametrize("N, K", [(1, 16), (37, 528), (129, 4096), (301, 11008), (8, 8208)])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("warps, persist", [(8, 0), (16, 0), (16, 2)])
def test_with_the_rms_norm_matches_the_norm_then_the_gemv(N, K, residual, warps, persist, monkeypatch):
    """The norm in the CUDA GEMV's input preparation (every CTA computes it; the first writes
    h + residual) against the norm rounded as the norm kernel rounds it, then the same GEMV, and
    against float64."""
    monkeypatch.setattr(CG, "WARPS", warps)
    monkeypatch.setattr(CG, "PERSIST", persist)
    monkeypatch.setattr(CG, "_sms", lambda index: 1)
    g = torch.Generator().manual_seed(N * K)
    h = (3 * torch.randn(1, K, generator=g)).to(torch.bfloat16).cuda()
    if not CG.available(h):
        pytest.skip("the CUDA GEMV does not build here")
    r = torch.randn(1, K, generator=g).to(torch.bfloat16).cuda() if residual else None
    w = (torch.rand(K, generator=g) + 0.5).to(torch.bfloat16).cuda()
    q, s, b = _layer(N, K, seed=K)
    h0, r0 = h.clone(), None if r is None else r.clone()
    out = CG.gemv_int8(h, q, s, b, norm_weight=w, eps=1e-5, residual=r)
    y, hr = out if residual else (out, None)
    x, v = _rms_norm_ref(h.view(-1), w, 1e-5, None if r is None else r.view(-1))
    assert torch.equal(h, h0) and (r is None or torch.equal(r, r0))  # inputs untouched
    if residual:
        assert hr.shape == (K,) and torch.equal(hr, v)
    unfused = CG.gemv_int8(x, q, s, b)
    ref = (q.double() @ x.double()) * s.double() + b.double()
    assert y.shape == (N,) and not y.isnan().any()
    # rsqrt and sum order may move a normalised input across a bf16 rounding boundary: a few at most
    assert ((y.double() - unfused.double()).norm() / ref.norm()).item() < 2e-3
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-2


@gpu
@pytest.mark.parametrize("persist", [0, 1])
def test_chained_under_pdl_in_a_cuda_graph(persist, monkeypatch):
    """Three GEMVs, each reading the one before, captured with PDL launches: the graph's replay
    gives what eager launches give (each kernel waits for its input), with one row per warp and
    with a persistent grid of one CTA."""
    monkeypatch.setattr(CG, "PERSIST", persist)
    monkeypatch.setattr(CG, "_sms", lambda index: 1)
    x = torch.randn(512).to(torch.bfloat16).cuda()
    if not CG.available(x):
        pytest.skip("the CUDA GEMV does not build here")
    layers = [_layer(512, 512, seed=i) for i in range(3)]

    def chain(v):
        for q, s, b in layers:
            v = CG.gemv_int8(v, q, s / 16, b, use_pdl=True)
        return v

    eager = chain(x)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(x)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = chain(x)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@gpu
def test_a_library_that_fails_its_first_product_is_not_used(monkeypatch):
    x = torch.randn(64).to(torch.bfloat16).cuda()
    monkeypatch.setattr(CG, "_checked", {})
    monkeypatch.setattr(CG, "_entry", lambda i: (lambda *args: 700))  # every launch fails
    assert not CG.available(x)
    monkeypatch.setattr(CG, "_checked", {})
    monkeypatch.setattr(CG, "_entry", lambda i: (lambda *args: 0))  # "launches", writes nothing
    assert not CG.available(x)


@gpu
def test_first_use_inside_a_graph_capture_keeps_triton_until_checked(monkeypatch):
    x = torch.randn(64).to(torch.bfloat16).cuda()
    monkeypatch.setattr(CG, "_checked", {})
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = CG.available(x)
    assert not captured and CG._checked == {}
    assert CG.available(x) == (CG._entry(x.device.index or 0) is not None)


@gpu
@pytest.mark.parametrize("N, K, G", [(1, 32, 32), (37, 530, 64), (129, 4096, 128), (301, 11008, 128), (8, 8200, 32)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("warps, minb, persist", [(8, 1, 0), (16, 1, 0), (16, 2, 0), (8, 3, 2), (16, 1, 1)])
def test_int4_matches_float64(N, K, G, bias, silu, warps, minb, persist, monkeypatch):
    """fastllm.stages.quantizers.int4's storage through the CUDA int4 GEMV: odd K (zero-padded to
    whole groups), every group size, bias, SiLU-and-mul inputs; registers capped (minb CTAs per
    SM) or not; a persistent grid of `persist` CTAs (the SM count taken as 1) or a CTA per `warps` rows."""
    from fastllm.stages.quantizers.int4 import dequantize_int4, pack_scales, quantize_int4

    monkeypatch.setattr(CG, "WARPS", warps)
    monkeypatch.setattr(CG, "INT4_MINB", minb)
    monkeypatch.setattr(CG, "PERSIST4", persist)
    monkeypatch.setattr(CG, "_sms", lambda index: 1)
    h = torch.randn(1, 2 * K if silu else K).to(torch.bfloat16).cuda()
    if not CG.available(h):
        pytest.skip("the CUDA GEMV does not build here")
    g = torch.Generator().manual_seed(N + K)
    packed, scales, zeros = quantize_int4(torch.randn(N, K, generator=g).cuda(), G)
    pairs = pack_scales(scales, zeros)
    b = torch.randn(N, generator=g).to(torch.bfloat16).cuda()
    if silu:
        gate, up = h.float().split(K, dim=-1)
        x = (torch.nn.functional.silu(gate) * up).to(torch.bfloat16)
    else:
        x = h
    out = CG.gemv_int4(h, packed, pairs, G, b if bias else None, silu_mul=silu)
    w = dequantize_int4(packed, scales, zeros, K).double()
    ref = w @ x.double().view(-1) + (b.double() if bias else 0)
    assert out.shape == (N,) and out.dtype == torch.bfloat16 and not out.isnan().any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2


@gpu
def test_gemv_int4_routes_to_it_when_asked_and_agrees_with_the_triton_kernel():
    from fastllm.kernels import gemv_int4 as G4
    from fastllm.stages.quantizers.int4 import pack_scales, quantize_int4

    x = torch.randn(1, 4096).to(torch.bfloat16).cuda()
    if not CG.available(x):
        pytest.skip("the CUDA GEMV does not build here")
    packed, scales, zeros = quantize_int4(torch.randn(300, 4096).cuda(), 128)
    pairs = pack_scales(scales, zeros)
    cuda = G4.gemv_int4(x, packed, scales, zeros, 128, pairs=pairs, cuda=True)
    triton_ = G4.gemv_int4(x, packed, scales, zeros, 128, pairs=pairs, cuda=False)
    assert cuda.shape == triton_.shape == (1, 300)
    assert ((cuda.double() - triton_.double()).norm() / triton_.double().norm()).item() < 1e-2

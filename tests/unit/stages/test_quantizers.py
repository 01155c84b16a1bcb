"""quantizer="int8": the quantization itself, the layer against a float64 reference on each
of its paths, the conformance kit, and the engine end to end on the real model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastllm import Engine, SamplingParams
from fastllm.errors import ConfigError
from fastllm.stages.base import LoadContext
from fastllm.stages.quantizers.int8 import Int8Linear, Int8Quantizer, quantize_int8
from fastllm.testing import check_model_transform


def test_quantize_int8_round_trip_is_within_half_a_step():
    w = torch.randn(37, 300) * torch.logspace(-3, 1, 37)[:, None]  # channels of very different ranges
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (37,)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()
    assert (q.abs().amax(1) == 127).all()  # every channel uses its full range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("K", [300, 320])  # bf16 on the CPU: 320 takes torch's int8 kernel, 300 cannot
def test_int8_linear_matches_its_dequantized_weight(dtype, M, K):
    lin = nn.Linear(K, 37, bias=True).to(dtype)
    layer = Int8Linear(lin)
    x = torch.randn(M, K, dtype=dtype)
    ref = x.double() @ layer.dequantize(torch.float64).T + lin.bias.double()
    out = layer(x)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.dtype == dtype and out.shape == (M, 37)
    assert err < (1e-6 if dtype == torch.float32 else 1e-2), err


def test_int8_linear_one_token_through_the_triton_gemv(monkeypatch):
    pytest.importorskip("triton")
    from fastllm.kernels import gemv

    monkeypatch.setattr(Int8Linear, "devices", ("cuda", "cpu"))  # Triton's interpreter on the CPU
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a, **k: real(*a, config=gemv.CONFIGS[1], **k))
    lin = nn.Linear(96, 45, bias=False)
    layer = Int8Linear(lin)
    x = torch.randn(1, 96)
    ref = x.double() @ layer.dequantize(torch.float64).T
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    nw, res = torch.rand(96) + 0.5, torch.randn(1, 96)
    from fastllm.core.cuda_linear import DecodeLinear

    monkeypatch.setattr(DecodeLinear, "fuse_norm", False)  # the default: a separate norm kernel runs
    assert layer.forward_normed(x, res, nw, 1e-6) is None
    monkeypatch.setattr(DecodeLinear, "fuse_norm", True)
    y, new_res = layer.forward_normed(x, res, nw, 1e-6)
    h = x + res
    normed = nw * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y.double(), normed.double() @ layer.dequantize(torch.float64).T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new_res, h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dynamic_activations_multiply_int8_by_int8(dtype):
    """W8A8: from 17 tokens the activations are quantized per token and torch._int_mm multiplies
    exactly; fewer tokens stay weight-only."""
    from fastllm.stages.quantizers.int8 import quantize_int8_rows

    lin = nn.Linear(96, 40, bias=True).to(dtype)
    layer = Int8Linear(lin, dynamic_activations=True)
    x = torch.randn(20, 96, dtype=dtype) * torch.logspace(-1, 1, 96).to(dtype)
    xq, xs = quantize_int8_rows(x)
    ref = (xq.double() * xs.double()) @ layer.dequantize(torch.float64).T + lin.bias.double()
    out = layer(x)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.dtype == dtype and err < (1e-6 if dtype == torch.float32 else 1e-2), err
    weight_only = x[:5].double() @ layer.dequantize(torch.float64).T + lin.bias.double()
    err = ((layer(x[:5]).double() - weight_only).norm() / weight_only.norm()).item()
    assert err < (1e-6 if dtype == torch.float32 else 1e-2), err
    with pytest.raises(ConfigError, match="activations"):
        Int8Quantizer(activations="static")


def test_smoothquant_moves_scale_into_the_weights_without_changing_the_model():
    from fastllm.stages.quantizers.int8 import smooth_into_norms
    from fastllm.testing import model_logits, tiny_llama

    ctx = LoadContext(torch.device("cpu"), torch.float32)
    model = tiny_llama(ctx, seed=5)
    ctx.text_tokenizer = lambda text, add_special_tokens=False: {
        "input_ids": [ord(c) % model.config.vocab_size for c in text]}
    prompts = [[3, 17, 42, 9, 5, 77]]
    before = model_logits(model, prompts)[0]
    qkv = model.model.layers[0].self_attn.qkv_proj.weight.detach().clone()
    smooth_into_norms(model, ctx, 0.8, ("lm_head",), 64, None)
    assert not torch.allclose(model.model.layers[0].self_attn.qkv_proj.weight, qkv)  # the weights moved
    torch.testing.assert_close(model_logits(model, prompts)[0], before, rtol=1e-4, atol=1e-4)  # the model did not
    for bad in ({"smooth": 0.5}, {"activations": "dynamic", "smooth": 1.5}, {"activations": "dynamic", "smooth": True}):
        with pytest.raises(ConfigError, match="smooth"):
            Int8Quantizer(**bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._int_mm on the int8 tensor cores needs CUDA")
@pytest.mark.parametrize("M", [17, 64, 300])
def test_int8_dynamic_activations_on_cuda(M):
    from fastllm.stages.quantizers.int8 import quantize_int8_rows

    lin = nn.Linear(4096, 1024, device="cuda", dtype=torch.bfloat16)
    layer = Int8Linear(lin, dynamic_activations=True)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    xq, xs = quantize_int8_rows(x)  # the Triton kernel on CUDA
    ref = (xq.double() * xs.double()) @ layer.dequantize(torch.float64).T + lin.bias.double()
    out = layer(x)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.dtype == torch.bfloat16 and err < 1e-2, err


def test_fp8_batches_on_the_cpu_round_activations_as_the_gpu_does():
    lin = nn.Linear(64, 32, bias=False)
    layer = Fp8Linear(lin)
    x = torch.randn(Fp8Linear.scaled_mm_min_tokens, 64)
    amax = x.abs().amax(dim=1, keepdim=True) / 448.0
    xr = (x / amax).to(torch.float8_e4m3fn).double() * amax.double()
    torch.testing.assert_close(layer(x).double(), xr @ layer.dequantize(torch.float64).T, rtol=1e-5, atol=1e-5)
    few = x[:3]  # below the threshold: weight-only
    torch.testing.assert_close(layer(few).double(), few.double() @ layer.dequantize(torch.float64).T,
                               rtol=1e-5, atol=1e-5)


def test_conformance_and_what_is_kept_in_full_precision():
    ctx = LoadContext(torch.device("cpu"), torch.float32)
    model = check_model_transform(Int8Quantizer(), "quantizer", ctx, max_rel_error=0.05)
    names = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert names and all("lm_head" not in n for n in names)
    assert type(model.lm_head) is nn.Linear
    model = check_model_transform(Int8Quantizer(skip=["*.o_proj"]), "quantizer", ctx, max_rel_error=0.05)
    assert isinstance(model.lm_head, Int8Linear)
    assert all(type(layer.self_attn.o_proj) is nn.Linear for layer in model.model.layers)


@pytest.mark.parametrize("skip", ["lm_head", [3]])
def test_bad_skip_is_a_config_error(skip):
    with pytest.raises(ConfigError, match="skip"):
        Int8Quantizer(skip=skip)


@pytest.mark.slow
def test_int8_engine_on_the_real_model_keeps_its_answers(smollm2_dir):
    sp = SamplingParams(temperature=0, max_tokens=8)
    with Engine(dtype="bfloat16", device="cpu", progress=False, quantizer="int8") as e:
        assert isinstance(e.runner.model.model.layers[0].mlp.down_proj, Int8Linear)
        out = e.generate("The capital of France is", sp)[0]
    assert "Paris" in out.text


# ---- int4 ---------------------------------------------------------------------------------

from fastllm.stages.quantizers.int4 import Int4Linear, Int4Quantizer, dequantize_int4, quantize_int4  # noqa: E402


@pytest.mark.parametrize("G", [32, 64, 128])
@pytest.mark.parametrize("K", [300, 256])  # padded to the group size, or not
def test_quantize_int4_round_trip_is_within_half_a_step(G, K):
    w = torch.randn(37, K) * torch.logspace(-2, 1, 37)[:, None]
    packed, scales, zeros = quantize_int4(w, G)
    Kp = -(-K // G) * G
    assert packed.dtype == torch.uint8 and packed.shape == (37, Kp // 2) and scales.shape == zeros.shape == (37, Kp // G)
    back = dequantize_int4(packed, scales, zeros, K)
    step = scales.repeat_interleave(G, dim=1)[:, :K]
    assert back.shape == w.shape and ((back - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("G", [32, 128])
@pytest.mark.parametrize("cfg", [0, 3, 6])
def test_int4_gemv_matches_the_dequantized_weight(monkeypatch, G, cfg):
    pytest.importorskip("triton")
    from fastllm.kernels import gemv_int4

    lin = nn.Linear(300, 45, bias=True)
    layer = Int4Linear(lin, G)
    x = torch.randn(1, 300)
    ref = x.double() @ layer.dequantize(torch.float64).T + lin.bias.double()
    out = gemv_int4.gemv_int4(x, layer.packed, layer.scales, layer.zeros, G, layer.bias, config=gemv_int4.CONFIGS[cfg],
                              words=False)  # the row kernel
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(Int4Linear, "devices", ("cuda", "cpu"))  # the layer's own one-token path: the word kernel
    real = gemv_int4.gemv_int4
    monkeypatch.setattr(gemv_int4, "gemv_int4", lambda *a, **k: real(*a, config=gemv_int4.WORD_CONFIGS[cfg], **k))
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_int4_down_proj_takes_silu_and_mul_into_its_gemv(monkeypatch):
    pytest.importorskip("triton")
    from fastllm.kernels import gemv_int4

    monkeypatch.setattr(Int4Linear, "devices", ("cuda", "cpu"))  # Triton's interpreter on the CPU
    real = gemv_int4.gemv_int4
    monkeypatch.setattr(gemv_int4, "gemv_int4", lambda *a, **k: real(*a, config=gemv_int4.WORD_CONFIGS[0], **k))
    layer = Int4Linear(nn.Linear(320, 45, bias=True), 64)
    gate_up = torch.randn(1, 640)
    assert layer.forward_silu_mul(gate_up) is None  # off by default (slower on an H100)
    monkeypatch.setattr(Int4Linear, "fuse_silu_mul", True)
    gate, up = gate_up.double().split(320, dim=-1)
    ref = (gate * torch.sigmoid(gate) * up) @ layer.dequantize(torch.float64).T + layer.bias.double()
    torch.testing.assert_close(layer.forward_silu_mul(gate_up).double(), ref, rtol=1e-5, atol=1e-5)
    assert layer.forward_silu_mul(torch.randn(2, 640)) is None  # more tokens: the caller's unfused path
    layer.register_buffer("inv_input_scale", torch.ones(320))  # activation-aware: not in the kernel
    assert layer.forward_silu_mul(gate_up) is None


@pytest.mark.parametrize("kind", ["int4", "int4-awq", "int8"])
def test_many_tokens_through_a_dense_weight(monkeypatch, kind):
    """From the layer's dense_min_tokens tokens (int4, and weight-only int8) it dequantizes its
    weight in one pass, [N, K] in the input's dtype, and multiplies densely; below, the Triton
    GEMM. Both agree with the float64 product."""
    pytest.importorskip("triton")
    from fastllm.kernels import qgemm

    cls, gemm, dequant = ((Int8Linear, "qgemm_rows", "dequantize_rows") if kind == "int8"
                          else (Int4Linear, "qgemm_int4", "dequantize_int4"))
    monkeypatch.setattr(cls, "devices", ("cuda", "cpu"))  # Triton's interpreter on the CPU
    real = getattr(qgemm, gemm)
    monkeypatch.setattr(qgemm, gemm, lambda *a, **k: real(*a, config=qgemm.CONFIGS[0], **k))
    calls, dense = [], getattr(qgemm, dequant)

    def spy(*a):
        w = dense(*a)
        calls.append((tuple(w.shape), w.dtype))
        return w

    monkeypatch.setattr(qgemm, dequant, spy)
    lin = nn.Linear(200, 40, bias=True)
    layer = (Int8Linear(lin) if kind == "int8" else
             Int4Linear(lin, 64, input_scale=1 + torch.rand(200) if kind == "int4-awq" else None))
    monkeypatch.setattr(cls, "dense_min_tokens", 6)
    x = torch.randn(7, 200)
    ref = x.double() @ layer.dequantize(torch.float64).T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-4)
    assert calls == [((40, 200), torch.float32)]  # K unpadded, the input's dtype
    torch.testing.assert_close(layer(x[:5]).double(), ref[:5], rtol=1e-5, atol=1e-4)
    assert len(calls) == 1  # five tokens: the GEMM


@pytest.mark.parametrize("K, G", [(300, 128), (256, 64)])  # 3 groups (padded to 4), 4 groups
def test_int4_linear_stores_scales_and_zeros_interleaved_and_reads_the_old_layout(K, G):
    from fastllm.stages.quantizers.int4 import pack_scales

    lin = nn.Linear(K, 45, bias=False)
    layer = Int4Linear(lin, G)
    packed, scales, zeros = quantize_int4(lin.weight.detach(), G)
    ng = scales.shape[1]
    assert layer.scales_zeros.shape == (45, ng + ng % 2, 2) and layer.scales_zeros.is_contiguous()
    assert layer.scales.data_ptr() == layer.scales_zeros.data_ptr()  # views: no second copy
    torch.testing.assert_close(layer.scales, scales, rtol=0, atol=0)
    torch.testing.assert_close(layer.zeros, zeros, rtol=0, atol=0)
    assert (layer.scales_zeros[:, ng:] == 0).all()
    assert set(layer.state_dict()) == {"packed", "scales_zeros"}
    # a state dict saved before the interleaving (separate scales and zeros) loads into the new layout
    other = Int4Linear(nn.Linear(K, 45, bias=False), G)
    missing, unexpected = other.load_state_dict({"packed": packed, "scales": scales * 2, "zeros": zeros}, strict=True)
    assert not missing and not unexpected
    torch.testing.assert_close(other.scales_zeros, pack_scales(scales * 2, zeros), rtol=0, atol=0)


@pytest.mark.parametrize("G", [32, 64, 128])
def test_int4_conformance(G):
    ctx = LoadContext(torch.device("cpu"), torch.float32)
    model = check_model_transform(Int4Quantizer(group_size=G), "quantizer", ctx)  # its declared bound: 0.3
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear) and type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("opts", [{"group_size": 48}, {"group_size": "64"}, {"skip": "lm_head"}])
def test_int4_bad_options_are_config_errors(opts):
    with pytest.raises(ConfigError):
        Int4Quantizer(**opts)


# ---- activation-aware int4 ------------------------------------------------------------------

from fastllm.stages.quantizers.awq import search_input_scale  # noqa: E402


def _rtn_error(w, x, G, s=None):
    s = torch.ones(w.shape[1]) if s is None else s
    wq = dequantize_int4(*quantize_int4(w * s[None, :], G), w.shape[1]) / s[None, :]
    return (x @ wq.T - x @ w.T).pow(2).mean().item()


def test_activation_aware_scaling_beats_plain_rounding_where_activations_are_uneven():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(200, 256, generator=g)
    x[:, :8] *= 30  # a few input channels carry large activations (as in real LLMs)
    s = search_input_scale(w, x, 64)
    assert s is not None and s.shape == (256,) and s[:8].mean() > s[8:].mean()
    assert _rtn_error(w, x, 64, s) < 0.8 * _rtn_error(w, x, 64)


def test_int4_linear_with_an_input_scale_applies_the_same_weight_on_every_path(monkeypatch):
    pytest.importorskip("triton")
    from fastllm.kernels import gemv_int4, qgemm

    lin = nn.Linear(128, 40)
    s = torch.rand(128) + 0.5
    layer = Int4Linear(lin, 32, s)
    assert ((layer.dequantize(torch.float32) - lin.weight).abs() < 0.25).all()  # still the same layer, roughly
    x = torch.randn(3, 128)
    ref = x.double() @ layer.dequantize(torch.float64).T + lin.bias.double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(Int4Linear, "devices", ("cuda", "cpu"))
    real = gemv_int4.gemv_int4
    monkeypatch.setattr(gemv_int4, "gemv_int4", lambda *a, **k: real(*a, config=gemv_int4.WORD_CONFIGS[0], **k))
    torch.testing.assert_close(layer(x[:1]).double(), ref[:1], rtol=1e-5, atol=1e-5)
    real_mm = qgemm.qgemm_int4
    monkeypatch.setattr(qgemm, "qgemm_int4", lambda *a, **k: real_mm(*a, config=qgemm.CONFIGS[0], **k))
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)  # the batch GEMM, input scaled


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_batches_on_the_gpu_path_take_the_quantized_gemm(monkeypatch, kind):
    """More than one token where the Triton kernels run (here: the interpreter): the layer calls
    fastllm.kernels.qgemm, never a dequantized weight, and agrees with that weight."""
    pytest.importorskip("triton")
    from fastllm.kernels import qgemm

    cls = {"int8": Int8Linear, "int4": Int4Linear, "fp8": Fp8Linear}[kind]
    lin = nn.Linear(200, 48)
    layer = cls(lin, 64) if kind == "int4" else cls(lin)
    x = torch.randn(7, 200)
    ref = x.double() @ layer.dequantize(torch.float64).T + lin.bias.double()
    monkeypatch.setattr(cls, "devices", ("cuda", "cpu"))
    monkeypatch.setattr(cls, "dequantize", lambda *a: pytest.fail("dequantized the weight"))
    calls = []
    for name in ("qgemm_rows", "qgemm_int4"):
        real = getattr(qgemm, name)
        monkeypatch.setattr(qgemm, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, config=qgemm.CONFIGS[0], **k))
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert calls == [1]


@pytest.mark.parametrize("kv_heads", [2, 4])  # grouped value heads (o_proj keeps its division); one per query head
def test_activation_aware_int4_folds_input_scales_out_of_the_run_time(monkeypatch, kv_heads):
    """The division by each layer's input scale moves where it costs nothing at run time: into the
    RMSNorm before qkv_proj and gate_up_proj, into gate_up_proj's up rows for down_proj, and (one
    value head per query head) into qkv_proj's value rows for o_proj. The model computes what it
    computes with every division done in an elementwise pass."""
    import copy

    from fastllm.stages.quantizers import awq
    from fastllm.stages.quantizers import int4 as int4_module
    from fastllm.testing import model_logits, tiny_llama

    ctx = LoadContext(torch.device("cpu"), torch.float32)
    model = tiny_llama(ctx, seed=7, num_key_value_heads=kv_heads)
    ctx.text_tokenizer = lambda text, add_special_tokens=False: {
        "input_ids": [ord(c) % model.config.vocab_size for c in text]}
    unfolded = copy.deepcopy(model)
    q = Int4Quantizer(group_size=32, activation_aware=True, calibration_tokens=32)

    def scales(seed):  # the same input scales for both models, whatever the calibration finds
        g = torch.Generator().manual_seed(seed)
        return lambda w, x, group: torch.rand(w.shape[1], generator=g) + 0.5

    monkeypatch.setattr(awq, "search_input_scale", scales(1))
    q.apply(model, ctx)
    monkeypatch.setattr(awq, "search_input_scale", scales(1))
    monkeypatch.setattr(int4_module, "norm_fed_linears", lambda m: {})  # nothing folded
    monkeypatch.setattr(awq, "fold_into_producers", lambda m, s: set())
    q.apply(unfolded, ctx)
    for block, ref in zip(model.model.layers, unfolded.model.layers):
        attn, mlp = block.self_attn, block.mlp
        assert attn.qkv_proj.inv_input_scale is None and mlp.gate_up_proj.inv_input_scale is None
        assert mlp.down_proj.inv_input_scale is None
        assert (attn.o_proj.inv_input_scale is None) == (kv_heads == 4)
        assert ref.mlp.down_proj.inv_input_scale is not None and ref.self_attn.qkv_proj.inv_input_scale is not None
        assert not torch.equal(block.input_layernorm.weight, ref.input_layernorm.weight)
    prompts = [[3, 17, 42, 9, 5, 77]]
    torch.testing.assert_close(model_logits(model, prompts)[0], model_logits(unfolded, prompts)[0],
                               rtol=1e-4, atol=1e-4)


def test_activation_aware_needs_a_tokenizer():
    with pytest.raises(ConfigError, match="tokenizer"):
        Engine("dummy:smollm2-135m", device="cpu", dtype="float32", progress=False,
               quantizer={"name": "int4", "activation_aware": True})


@pytest.mark.slow
def test_activation_aware_int4_beats_plain_int4_on_the_real_model(smollm2_dir):
    from fastllm.eval import perplexity

    ppl = {}
    for aware in (False, True):
        q = {"name": "int4", "group_size": 128, "activation_aware": aware, "calibration_tokens": 256}
        with Engine(dtype="float32", device="cpu", progress=False, quantizer=q) as e:
            ppl[aware] = perplexity(e, context=256, max_tokens=1024).perplexity
    assert ppl[True] < ppl[False], ppl


@pytest.mark.parametrize("K, G", [(256, 64), (300, 128)])  # K a multiple of the group, or padded
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("M", [1, 3])
def test_int4_on_the_cpu_with_bf16_takes_torchs_kernel_and_agrees(K, G, scaled, M):
    lin = nn.Linear(K, 48).to(torch.bfloat16)
    layer = Int4Linear(lin, G, torch.rand(K) + 0.5 if scaled else None)
    x = torch.randn(M, K, dtype=torch.bfloat16)
    out = layer(x)
    assert getattr(layer, "_cpu", None) is not None  # N = 48: torch's CPU int4 kernel ran
    ref = x.double() @ layer.dequantize(torch.float64).T + lin.bias.double()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.dtype == torch.bfloat16 and err < 2e-2, err


# ---- fp8 -------------------------------------------------------------------------------------

from fastllm.stages.quantizers.fp8 import Fp8Linear, Fp8Quantizer, quantize_fp8  # noqa: E402


def test_quantize_fp8_keeps_three_mantissa_bits():
    w = torch.randn(37, 300) * torch.logspace(-3, 1, 37)[:, None]
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (37,)
    back = q.float() * s[:, None]
    big = w.abs() > s[:, None] * 2 ** -6  # normal e4m3 range: relative error <= 2^-4
    assert ((back - w).abs()[big] <= w.abs()[big] * 2 ** -4 + 1e-12).all()


def test_fp8_linear_dequantized_path_and_one_token_gemv(monkeypatch):
    pytest.importorskip("triton")
    from fastllm.kernels import gemv

    lin = nn.Linear(96, 45)
    layer = Fp8Linear(lin)
    x = torch.randn(4, 96)
    ref = x.double() @ layer.dequantize(torch.float64).T + lin.bias.double()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(Fp8Linear, "devices", ("cuda", "cpu"))  # the GEMV in Triton's interpreter
    real = gemv.gemv
    monkeypatch.setattr(gemv, "gemv", lambda *a, **k: real(*a, config=gemv.CONFIGS[1], **k))
    torch.testing.assert_close(layer(x[:1]).double(), ref[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capability,refused", [((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False)])
def test_fp8_refused_on_gpus_without_fp8(monkeypatch, capability, refused):
    # A GPU without fp8 (before Ada / Hopper) gets a ConfigError naming the card, its compute
    # capability and the way out, before any layer is swapped.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    model = nn.Sequential(nn.Linear(32, 16))
    ctx = LoadContext(torch.device("cuda", 0), torch.bfloat16)
    if refused:
        with pytest.raises(ConfigError, match=r"8\.9 or later .*Some GPU is {}\.{}.*Use int8 instead".format(*capability)):
            Fp8Quantizer().apply(model, ctx)
        assert type(model[0]) is nn.Linear
    else:
        assert type(Fp8Quantizer().apply(model, ctx)[0]) is Fp8Linear


def test_fp8_conformance():
    ctx = LoadContext(torch.device("cpu"), torch.float32)
    model = check_model_transform(Fp8Quantizer(), "quantizer", ctx)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, Fp8Linear) and type(model.lm_head) is nn.Linear


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._scaled_mm needs CUDA")
@pytest.mark.parametrize("M", [2, 5, 17, 300])  # odd M (pytorch#133334)
def test_fp8_batches_through_scaled_mm_match_the_dequantized_weight(M):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    lin = nn.Linear(4096, 1024, device="cuda", dtype=torch.bfloat16)
    layer = Fp8Linear(lin)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ layer.dequantize(torch.float64).T + lin.bias.double()
    out = layer(x)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.dtype == torch.bfloat16 and err < 0.06, err  # activations in e4m3 too: a few percent

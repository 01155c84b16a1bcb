"""Pruners (magnitude, wanda, 2:4): the masks against brute-force definitions on odd shapes, the
conformance kit, combination with the quantizers, and the engine on the real model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastllm import Engine
from fastllm.errors import ConfigError
from fastllm.stages.base import LoadContext
from fastllm.stages.pruners import global_threshold, layer_mask, nm_mask, row_mask
from fastllm.stages.pruners.magnitude import MagnitudePruner
from fastllm.stages.pruners.semi_structured import SemiStructuredPruner
from fastllm.stages.pruners.wanda import WandaPruner
from fastllm.testing import check_model_transform, tiny_llama

CPU = LoadContext(torch.device("cpu"), torch.float32)


class WordIds:
    """A stand-in tokenizer for the tiny random model: one id per character."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % self.vocab for c in text]}


def _ctx_with_tokenizer(model):
    ctx = LoadContext(torch.device("cpu"), torch.float32)
    ctx.text_tokenizer = WordIds(model.config.vocab_size)
    return ctx


@pytest.mark.parametrize("N, K, s", [(7, 13, 0.5), (5, 40, 0.25), (3, 9, 0.7), (4, 6, 0.0)])
def test_row_and_layer_masks_zero_exactly_the_smallest(N, K, s):
    score = torch.rand(N, K)
    m = row_mask(score, s)
    assert (m.sum(1) == K - int(K * s)).all()
    for r in range(N):  # every zeroed score is below every kept one, row by row
        if (~m[r]).any():
            assert score[r][~m[r]].max() < score[r][m[r]].min()
    m = layer_mask(score, s)
    assert int((~m).sum()) == int(N * K * s)
    if (~m).any():
        assert score[~m].max() < score[m].min()


def test_nm_mask_keeps_the_two_largest_of_every_four():
    score = torch.rand(6, 20)
    m = nm_mask(score, 2, 4)
    groups, keep = score.view(6, 5, 4), m.view(6, 5, 4)
    assert (keep.sum(2) == 2).all()
    assert (groups.masked_fill(~keep, float("inf")).amin(2) >= groups.masked_fill(keep, -1).amax(2)).all()
    with pytest.raises(ConfigError, match="divisible by 4"):
        nm_mask(torch.rand(3, 10))


def test_global_threshold_matches_a_sort():
    scores = [torch.rand(13, 7), torch.rand(5, 29) * 3, torch.rand(1, 50) * 0.1]
    allv = torch.cat([s.flatten() for s in scores]).sort().values
    for s in (0.1, 0.5, 0.9):
        t = global_threshold(scores, s)
        k = int(allv.numel() * s)
        assert int((allv <= t).sum()) == k  # exactly the k smallest lie at or below it


@pytest.mark.parametrize("scope", ["layer", "row", "global"])
def test_magnitude_pruner_sparsity_and_conformance(scope):
    model = check_model_transform(MagnitudePruner(0.5, scope), "pruner", CPU, max_rel_error=2.0)
    assert model.fastllm_sparsity == pytest.approx(0.5, abs=0.01)
    assert (model.lm_head.weight != 0).all()  # skipped by default
    for layer in (model.model.layers[0].self_attn.qkv_proj, model.model.layers[-1].mlp.down_proj):
        w = layer.weight
        assert 0.3 < float((w == 0).float().mean()) < 0.7
        if scope == "row":
            assert ((w == 0).sum(1) == w.shape[1] // 2).all()


def test_wanda_keeps_the_weights_that_meet_large_activations():
    """One input feature carries 100x the activation of the others: magnitude pruning ignores it,
    Wanda keeps its weights in every row."""
    def pruned(pruner):
        model = tiny_llama(CPU, seed=3)
        layer = model.model.layers[1].mlp.down_proj
        with torch.no_grad():  # column 5: well under half of every row, all of one size
            layer.weight[:, 5] = 0.1 * layer.weight.abs().median()
        hook = layer.register_forward_pre_hook(lambda m, a: (a[0].clone().index_fill_(-1, torch.tensor([5]), 1e3),))
        try:
            pruner.apply(model, _ctx_with_tokenizer(model))
        finally:
            hook.remove()
        return layer.weight

    w = pruned(MagnitudePruner(0.5, scope="row"))
    assert (w[:, 5] == 0).all()
    w = pruned(WandaPruner(0.5, calibration_tokens=64))
    assert (w[:, 5] != 0).all()
    assert ((w == 0).sum(1) == w.shape[1] // 2).all()  # still half of every row


@pytest.mark.parametrize("sequential", [True, False])
def test_wanda_conformance(sequential):
    model = tiny_llama(CPU, seed=1)
    out = check_model_transform(WandaPruner(0.5, calibration_tokens=64, sequential=sequential), "pruner",
                                _ctx_with_tokenizer(model), model=model, max_rel_error=2.0)
    assert out.fastllm_sparsity == pytest.approx(0.5, abs=0.01)


def test_wanda_needs_a_tokenizer():
    with pytest.raises(ConfigError, match="tokenizer"):
        WandaPruner(0.5).apply(tiny_llama(CPU), CPU)


@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_two_four_pattern_masked_on_the_cpu(score):
    model = tiny_llama(CPU, seed=2)
    out = check_model_transform(SemiStructuredPruner(score, calibration_tokens=64), "pruner",
                                _ctx_with_tokenizer(model), model=model, max_rel_error=2.0)
    for layer in (out.model.layers[0].self_attn.qkv_proj, out.model.layers[0].mlp.gate_up_proj):
        w = layer.weight
        assert w.layout == torch.strided  # masked dense: no sparse kernels on the CPU
        assert ((w.view(w.shape[0], -1, 4) != 0).sum(2) <= 2).all()
    assert out.fastllm_sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("opts, match", [({"sparsity": 1.0}, "sparsity"), ({"sparsity": "half"}, "sparsity"),
                                         ({"scope": "column"}, "scope"), ({"skip": "lm_head"}, "skip")])
def test_bad_magnitude_options(opts, match):
    with pytest.raises(ConfigError, match=match):
        MagnitudePruner(**opts)


def test_two_four_refuses_sparse_storage_off_cuda_and_odd_widths():
    with pytest.raises(ConfigError, match="storage='sparse' needs a CUDA GPU"):
        SemiStructuredPruner(storage="sparse").apply(tiny_llama(CPU), CPU)
    odd = nn.Module()
    odd.proj = nn.Linear(10, 8)
    with pytest.raises(ConfigError, match="in_features=10"):
        SemiStructuredPruner().apply(odd, CPU)
    with pytest.raises(ConfigError, match="score"):
        SemiStructuredPruner(score="random")


@pytest.mark.parametrize("quantizer", ["int8", "int4"])
def test_pruned_zeros_survive_quantization(quantizer):
    from fastllm.stages.quantizers.int4 import Int4Quantizer
    from fastllm.stages.quantizers.int8 import Int8Quantizer

    model = SemiStructuredPruner().apply(tiny_llama(CPU, seed=4), CPU)
    zeros = model.model.layers[0].mlp.down_proj.weight == 0
    q = Int8Quantizer() if quantizer == "int8" else Int4Quantizer(group_size=32)
    model = q.apply(model, CPU)
    w = model.model.layers[0].mlp.down_proj.dequantize(torch.float32)
    assert (w[zeros] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="semi-structured sparse kernels need CUDA (compute capability 8.0+)")
def test_two_four_sparse_storage_on_cuda_matches_the_masked_weight():
    ctx = LoadContext(torch.device("cuda"), torch.bfloat16)
    model = nn.Module()
    model.proj = nn.Linear(256, 128, bias=False, device="cuda", dtype=torch.bfloat16)
    SemiStructuredPruner(storage="masked").apply(model, ctx)
    dense = model.proj.weight.detach().clone()
    SemiStructuredPruner(storage="sparse").apply(model, ctx)  # already 2:4: the same zeros
    assert model.proj.weight.layout != torch.strided or type(model.proj.weight.data).__name__.startswith("Sparse")
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(model.proj(x).float(), (x @ dense.T).float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ConfigError, match="2:4 sparse weight"):
        from fastllm.stages.quantizers.int8 import Int8Quantizer

        Int8Quantizer().apply(model, ctx)


def test_wanda_beats_magnitude_on_the_real_model(smollm2_dir):
    from fastllm.eval import perplexity

    ppl = {}
    for name in ("magnitude", "wanda"):
        pruner = {"name": name, "sparsity": 0.5}
        if name == "wanda":
            pruner |= {"calibration_tokens": 256, "sequential": False}
        with Engine(str(smollm2_dir), device="cpu", dtype="float32", pruner=pruner, progress=False) as e:
            ppl[name] = perplexity(e, max_tokens=256).perplexity
    assert ppl["wanda"] < 0.5 * ppl["magnitude"], ppl


@pytest.mark.parametrize("pruner, quantizer", [({"name": "magnitude", "sparsity": 0.25}, None),
                                               ({"name": "2:4"}, "int8")])
def test_fastllm_prune_saves_a_model_that_loads_with_the_same_logits(smollm2_dir, tmp_path, pruner, quantizer):
    import json

    from fastllm.cli import main

    ids = [504, 3575, 282, 4649, 314, 7042, 30, 378]
    opts = dict(dtype="float32", device="cpu", progress=False)
    out = tmp_path / "p"
    argv = ["prune", str(out), "--pruner", json.dumps(pruner), "--dtype", "float32", "--device", "cpu"]
    assert main(argv + (["--quantizer", quantizer] if quantizer else [])) == 0
    meta = json.loads((out / "fastllm_quantization.json").read_text())
    assert meta["pruner"]["name"] == pruner["name"] and meta["quantizer"]["name"] == (quantizer or "none")
    with Engine(**opts, pruner=pruner, quantizer=quantizer or "none") as fresh:
        want = fresh.prompt_logits(ids)
    with Engine(str(out), **opts) as saved:  # nothing pruned or quantized at start-up: the file holds it
        got = saved.prompt_logits(ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        key = "model.layers.0.mlp.down_proj." + ("qweight" if quantizer else "weight")
        w = f.get_tensor(key)
    assert float((w == 0).float().mean()) >= (0.5 if pruner["name"] == "2:4" else 0.25) - 0.01


def test_prune_needs_a_pruner(capsys, tmp_path):
    from fastllm.cli import main

    assert main(["prune", str(tmp_path / "p"), "--model", "dummy:tiny"]) == 2
    assert "needs --pruner" in capsys.readouterr().err

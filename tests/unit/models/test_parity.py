"""fastllm's model code against HF transformers on tiny random checkpoints of every family:
logits at every position, greedy generation, flat varlen batches and chunked prefill."""
from __future__ import annotations

import random

import pytest
import torch

from fastllm import Engine, SamplingParams
from fastllm.core.request import Batch, Request
from fastllm.models.context import ForwardContext
from fastllm.stages.attention.sdpa import SDPAAttention
from fastllm.stages.base import KVSpec, LoadContext
from fastllm.stages.loaders.safetensors import SafetensorsLoader
from helpers import LLAMA3_ROPE, assert_logits_close, hf_greedy, hf_logits, load_hf, make_tiny_model

CASES = {
    "llama": ("llama", {}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
    "qwen2-yarn-rope": ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                    "original_max_position_embeddings": 32}}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-attention-bias": ("llama", {"attention_bias": True}),
    "llama-mlp-bias": ("llama", {"mlp_bias": True}),
    "llama-head-dim": ("llama", {"head_dim": 32}),  # head_dim != hidden / heads
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),
    "qwen3-mha": ("qwen3", {"num_key_value_heads": 4, "head_dim": 32}),
}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def random_ids(n: int, seed: int, vocab: int = 300) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case -> (checkpoint dir, HF model, fastllm Engine), built once per module."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("parity")

    def get(case: str):
        if case not in cache:
            family, overrides = CASES[case]
            d = make_tiny_model(root / case, family, **overrides)
            cache[case] = (d, load_hf(d), Engine(str(d), dtype="float32", device="cpu", progress=False))
        return cache[case]

    yield get
    for _, _, engine in cache.values():
        engine.close()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("length", [1, 13, 37])
def test_prompt_logits_match_hf(built, case, length):
    _, hf, engine = built(case)
    ids = random_ids(length, seed=length)
    assert_logits_close(engine.prompt_logits(ids), hf_logits(hf, ids))


@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_hf(built, case):
    _, hf, engine = built(case)
    ids = random_ids(13, seed=1)
    out = engine.generate({"prompt_token_ids": ids}, GREEDY)[0]
    assert out.token_ids == hf_greedy(hf, ids, 12)
    assert out.finish_reason == "length"


@pytest.mark.parametrize("case", ["llama", "llama3-rope", "qwen2", "qwen3"])
def test_batch_of_varied_lengths_matches_each_alone(built, case):
    _, hf, engine = built(case)
    prompts = [{"prompt_token_ids": random_ids(n, seed=n)} for n in (5, 1, 37, 13, 2)]
    together = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    alone = [engine.generate(p, GREEDY)[0].token_ids for p in prompts]
    assert together == alone
    assert together[2] == hf_greedy(hf, prompts[2]["prompt_token_ids"], 12)


@pytest.mark.parametrize("case", ["llama", "llama3-rope", "mistral", "qwen2", "qwen3"])
def test_chunked_prefill_matches_hf(built, case):
    d, hf, _ = built(case)
    ids = random_ids(40, seed=40)
    with Engine(str(d), dtype="float32", device="cpu", progress=False, max_num_batched_tokens=16) as engine:
        steps: list[list[int]] = []
        run = engine.runner.run
        engine.runner.run = lambda batch, rows, *a: (steps.append(list(batch.num_new)), run(batch, rows, *a))[1]
        out = engine.generate({"prompt_token_ids": ids}, GREEDY)[0]
        assert steps[:3] == [[16], [16], [8]]  # the prompt really went in three chunks
        assert out.token_ids == hf_greedy(hf, ids, 12)
        # a batch where prompt chunks and other sequences share the token budget
        prompts = [{"prompt_token_ids": random_ids(n, seed=n)} for n in (40, 7, 23)]
        together = [o.token_ids for o in engine.generate(prompts, GREEDY)]
        assert together == [hf_greedy(hf, p["prompt_token_ids"], 12) for p in prompts]


@pytest.mark.parametrize("case", ["llama", "llama-head-dim", "qwen3"])
@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_forward_logits_match_hf(built, case, chunk):
    """The model over a prompt fed in chunks (KV cache carried between them) gives HF's logits."""
    d, hf, _ = built(case)
    ctx = LoadContext(torch.device("cpu"), torch.float32, progress=False)
    model = SafetensorsLoader().load(str(d), ctx).model
    layers, heads, kv_heads, head_dim = model.attn_shape
    attn = SDPAAttention()
    attn.setup(KVSpec(layers, heads, kv_heads, head_dim, torch.float32, ctx.device, head_dim ** -0.5))
    ids = random_ids(37, seed=37)
    req = Request("r", None, ids, SamplingParams(max_tokens=1), sink=lambda _: None, max_len=64)
    attn.allocate(req.id, len(ids))
    parts = []
    with torch.inference_mode():
        for s in range(0, len(ids), chunk):
            n = min(chunk, len(ids) - s)
            batch = Batch([req], [n])
            hidden = model(torch.tensor(ids[s:s + n]), torch.arange(s, s + n),
                           ForwardContext(attn, attn.plan(batch), batch))
            parts.append(model.compute_logits(hidden))
            req.num_computed += n
    assert_logits_close(torch.cat(parts), hf_logits(hf, ids))


@pytest.mark.parametrize("case", ["llama", "llama3-rope", "qwen2", "qwen3"])
def test_bfloat16_logits_match_hf(built, case):
    from transformers import AutoModelForCausalLM

    d, _, _ = built(case)
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16).eval()
    ids = random_ids(37, seed=3)
    with Engine(str(d), dtype="bfloat16", device="cpu", progress=False) as engine:
        ours = engine.prompt_logits(ids)
    ref = hf_logits(hf, ids)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 2e-2 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("overrides, match", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "dynamic"),
    ({"hidden_act": "gelu"}, "gelu"),
])
def test_unsupported_features_raise_typed_error(tmp_path, overrides, match):
    from fastllm.errors import UnsupportedModelError

    d = make_tiny_model(tmp_path, "llama", **overrides)
    with pytest.raises(UnsupportedModelError, match=match):
        Engine(str(d), loader="safetensors", dtype="float32", device="cpu", progress=False)


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastllm.errors import UnsupportedModelError

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="loader='transformers'"):
        Engine(str(tmp_path), loader="safetensors", dtype="float32", device="cpu", progress=False)

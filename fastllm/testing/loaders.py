"""Conformance of loaders: what a loader returns is a model the engine can serve."""
from __future__ import annotations

import random

import torch
from torch import nn

from ..stages.base import LoadContext, LoadedModel
from .api import check_api_version
from .models import cpu_context, model_logits, rel_error

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def check_model_interface(model: nn.Module, who: str) -> tuple[int, int]:
    """The model has what the engine calls: attn_shape, config.vocab_size, compute_logits.
    Returns (vocab_size, num_layers)."""
    assert isinstance(model, nn.Module), f"{who}: the model is a {type(model).__name__}, not a torch nn.Module"
    shape = getattr(model, "attn_shape", None)
    assert isinstance(shape, tuple) and len(shape) == 4 and all(type(x) is int and x > 0 for x in shape), (
        f"{who}: model.attn_shape must be (layers, heads, kv_heads, head_dim) positive ints, got {shape!r}")
    assert shape[1] % shape[2] == 0, f"{who}: {shape[1]} query heads are not a multiple of {shape[2]} kv heads"
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    assert type(vocab) is int and vocab > 0, f"{who}: model.config.vocab_size must be a positive int, got {vocab!r}"
    assert callable(getattr(model, "compute_logits", None)), f"{who}: the model lacks compute_logits(hidden)"
    return vocab, shape[0]


def check_logits(model: nn.Module, vocab: int, who: str, dtype: torch.dtype, seed: int = 0,
                 rtol: float | None = None) -> list[torch.Tensor]:
    """Finite logits [T, V] for a flat batch of two prompts, the same whether each prompt runs
    alone, batched, in one step or in chunks over the cache. Returns the batched logits."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (7, 3)]
    rtol = TOLERANCE.get(dtype, 5e-2) if rtol is None else rtol
    batched = model_logits(model, prompts, dtype=dtype)
    for p, lg in zip(prompts, batched):
        assert lg.shape == (len(p), vocab), f"{who}: logits of a {len(p)}-token prompt have shape " \
                                            f"{tuple(lg.shape)}, expected ({len(p)}, {vocab})"
        assert torch.isfinite(lg).all(), f"{who}: logits hold NaN or inf"
    alone = model_logits(model, prompts[:1], dtype=dtype)[0]
    err = rel_error(batched[0], alone)
    assert err <= rtol, f"{who}: a prompt's logits change when another prompt shares its batch " \
                        f"(relative error {err:.3g} > {rtol:.3g})"
    chunked = model_logits(model, prompts, steps=3, dtype=dtype)
    for p, a, b in zip(prompts, batched, chunked):
        err = rel_error(b, a)
        assert err <= rtol, f"{who}: logits of a {len(p)}-token prompt fed in 3 steps over the KV cache differ " \
                            f"from one step (relative error {err:.3g} > {rtol:.3g}): cached keys or positions are wrong"
    return batched


def check_loader(loader, model_arg: str | None, ctx: LoadContext | None = None, *,
                 rtol: float | None = None) -> LoadedModel:
    """`loader.load(model_arg, ctx)` returns a LoadedModel the engine can serve: the model on
    ctx.device in ctx.dtype with no gradients, sane limits and EOS ids, a working tokenizer (or
    None), and finite logits that do not depend on batching or chunking. Returns the LoadedModel."""
    check_api_version(loader, "loader")
    ctx = ctx or cpu_context()
    who = f"loader {type(loader).__name__}({model_arg!r})"
    loaded = loader.load(model_arg, ctx)
    assert isinstance(loaded, LoadedModel), f"{who}: load() returned a {type(loaded).__name__}, not a LoadedModel"
    vocab, _ = check_model_interface(loaded.model, who)
    for name, t in list(loaded.model.named_parameters()) + list(loaded.model.named_buffers()):
        assert t.device.type == ctx.device.type, f"{who}: {name} is on {t.device}, ctx.device is {ctx.device}"
    for name, p in loaded.model.named_parameters():
        assert not p.requires_grad, f"{who}: {name} requires grad; build inference models with requires_grad_(False)"
        if p.is_floating_point():
            assert p.dtype == ctx.dtype, f"{who}: {name} is {p.dtype}, ctx.dtype is {ctx.dtype}"
    training = [n for n, m in loaded.model.named_modules() if m.training and n]  # a bare wrapper may be
    assert not training, f"{who}: {training[0]} is in training mode (dropout on); call model.eval()"
    assert type(loaded.max_model_len) is int and loaded.max_model_len > 0, (
        f"{who}: max_model_len must be a positive int, got {loaded.max_model_len!r}")
    assert isinstance(loaded.eos_token_ids, (set, frozenset)) and all(
        type(i) is int and 0 <= i for i in loaded.eos_token_ids), (
        f"{who}: eos_token_ids must be a set of non-negative ints, got {loaded.eos_token_ids!r}")
    assert isinstance(loaded.name, str) and loaded.name, f"{who}: name must be a non-empty str"
    if loaded.tokenizer is not None:
        ids = loaded.tokenizer.encode("Hello, world")
        assert ids and all(type(i) is int and 0 <= i < vocab for i in ids), (
            f"{who}: tokenizer.encode('Hello, world') gave {ids!r}, not token ids in [0, {vocab})")
        assert isinstance(loaded.tokenizer.decode(ids), str), f"{who}: tokenizer.decode does not return a str"
    check_logits(loaded.model, vocab, who, ctx.dtype, rtol=rtol)
    return loaded

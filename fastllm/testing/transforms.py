"""Conformance of start-up transforms (quantizer, pruner, parallelizer)."""
from __future__ import annotations

import random

import torch
from torch import nn

from ..stages.base import LoadContext
from .api import check_api_version
from .loaders import TOLERANCE, check_model_interface
from .models import cpu_context, model_logits, rel_error, tiny_llama

# How far (relative Frobenius error of the logits of the tiny model) a transform may move the
# output by default. A parallelizer must not change it; a quantizer only a little; pruning half
# the weights of a random model moves it more. Callers pass their own bound.
MAX_REL_ERROR = {"quantizer": 0.15, "pruner": 0.6, "parallelizer": 1e-4}


def check_model_transform(transform, stage: str, ctx: LoadContext | None = None, *,
                          model: nn.Module | None = None, max_rel_error: float | None = None,
                          seed: int = 0) -> nn.Module:
    """Apply `transform` (a quantizer, pruner or parallelizer) to `model` (default: the tiny
    random Llama of fastllm.testing) and check the result: the same model interface, finite
    logits of the right shape, consistent over the KV cache, and within `max_rel_error` of the
    original logits. Returns the transformed model."""
    assert stage in MAX_REL_ERROR, f"stage must be one of {sorted(MAX_REL_ERROR)}, got {stage!r}"
    check_api_version(transform, stage)
    ctx = ctx or cpu_context()
    model = tiny_llama(ctx, seed=seed) if model is None else model
    who = f"{stage} {type(transform).__name__}"
    vocab, _ = check_model_interface(model, f"{who} (input model)")
    shape = model.attn_shape
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (9, 4, 1)]
    before = model_logits(model, prompts, dtype=ctx.dtype)

    out = transform.apply(model, ctx)
    assert out is not None, f"{who}: apply() returned None; return the (transformed) model"
    check_model_interface(out, who)
    assert out.attn_shape == shape, f"{who}: attn_shape changed from {shape} to {out.attn_shape}"
    assert out.config.vocab_size == vocab, f"{who}: vocab_size changed from {vocab} to {out.config.vocab_size}"
    for name, t in list(out.named_parameters()) + list(out.named_buffers()):
        assert t.device.type == ctx.device.type, f"{who}: {name} moved to {t.device}, ctx.device is {ctx.device}"

    after = model_logits(out, prompts, dtype=ctx.dtype)
    # a transform may declare how far it moves the tiny random model (4-bit weights move it more)
    bound = max_rel_error if max_rel_error is not None else getattr(
        transform, "conformance_max_rel_error", MAX_REL_ERROR[stage])
    for p, a, b in zip(prompts, before, after):
        assert b.shape == a.shape, f"{who}: logits shape {tuple(b.shape)}, expected {tuple(a.shape)}"
        assert torch.isfinite(b).all(), f"{who}: the transformed model gives NaN or inf logits"
    err = rel_error(torch.cat(after), torch.cat(before))
    assert err <= bound, (f"{who}: logits moved by relative error {err:.3g} > {bound:.3g} from the "
                          f"untransformed model (pass max_rel_error= to allow more)")
    chunked = model_logits(out, prompts, steps=4, dtype=ctx.dtype)
    rtol = max(TOLERANCE.get(ctx.dtype, 5e-2), 1e-3)
    err = rel_error(torch.cat(chunked), torch.cat(after))
    assert err <= rtol, (f"{who}: the transformed model gives different logits when prompts are fed in "
                         f"chunks or one token at a time (relative error {err:.3g} > {rtol:.3g})")
    return out

"""A tiny random Llama built from fastllm's own model code (no download), and a way to get its
logits without the engine."""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from ..core.request import Batch
from ..models.context import ForwardContext
from ..stages.base import KVSpec, LoadContext
from .reference import ReferenceAttention, fake_request

# Multiples of 128 everywhere, so quantizers with group sizes up to 128 and 2:4 pruning apply.
TINY_LLAMA = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)


def cpu_context(dtype: torch.dtype = torch.float32) -> LoadContext:
    """A LoadContext for CPU tests: no progress bars."""
    return LoadContext(torch.device("cpu"), dtype, progress=False)


def tiny_llama_config(**overrides):
    """A transformers LlamaConfig of TINY_LLAMA sizes (about 300k parameters)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{**TINY_LLAMA, **overrides})
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def tiny_llama(ctx: LoadContext | None = None, seed: int = 0, **overrides) -> nn.Module:
    """fastllm's Llama of `tiny_llama_config(**overrides)` on ctx.device in ctx.dtype.

    Weights are N(0, 1/fan_in), so every layer changes the logits as much as in a trained
    model: a transform that breaks a layer shows in the output."""
    from ..stages.loaders.common import build_model

    ctx = ctx or cpu_context()
    model = build_model(tiny_llama_config(**overrides), ctx)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                w = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith(".bias"):
                w = 0.1 * torch.randn(p.shape, generator=g)
            else:  # embeddings [V, hidden] and linear weights [out, in]
                fan_in = p.shape[-1] if "embed" not in name else 1
                w = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
            p.copy_(w.to(p.dtype))
    return model


def model_device(model: nn.Module) -> torch.device:
    p = next(itertools.chain(model.parameters(), model.buffers()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def model_logits(model: nn.Module, prompts: list[list[int]], steps: int = 1, attention=None,
                 dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Logits [len(p), V] (float32, CPU) at every position of each prompt.

    All prompts run as one flat batch; each is fed in `steps` chunks, so steps > 1 exercises the
    model's use of cached keys (steps = len(p) is token-by-token decoding)."""
    device = model_device(model)
    if attention is None:
        layers, heads, kv_heads, head_dim = model.attn_shape
        attention = ReferenceAttention()
        attention.setup(KVSpec(layers, heads, kv_heads, head_dim, dtype or torch.float32, device, head_dim ** -0.5))
    reqs = [fake_request(f"logits-{i}", p, max_tokens=1) for i, p in enumerate(prompts)]
    for r in reqs:
        attention.allocate(r.id, r.num_prompt)
    outs: list[list[torch.Tensor]] = [[] for _ in reqs]
    try:
        for step in range(steps):
            live, nums = [], []
            for i, r in enumerate(reqs):
                end = math.ceil(r.num_prompt * (step + 1) / steps)
                if end > r.num_computed:
                    live.append(i)
                    nums.append(end - r.num_computed)
            if not live:
                continue
            batch = Batch([reqs[i] for i in live], nums)
            ids, pos, _, _ = batch.flat()
            hidden = model(torch.tensor(ids, device=device), torch.tensor(pos, device=device),
                           ForwardContext(attention, attention.plan(batch), batch))
            logits = model.compute_logits(hidden).float().cpu()  # [T, V]
            for i, part in zip(live, logits.split(nums)):
                outs[i].append(part)
            for r, n in zip(batch.requests, nums):
                r.num_computed += n
    finally:
        for r in reqs:
            attention.free(r.id)
    return [torch.cat(o) for o in outs]


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| (Frobenius)."""
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def tiny_checkpoint(path, seed: int = 0, **overrides):
    """Write an HF checkpoint directory (config.json, model.safetensors) of a random
    `tiny_llama_config(**overrides)` model to `path`; return it as a Path. For loader tests."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(tiny_llama_config(**overrides), dtype=torch.float32)
    hf.save_pretrained(str(path))
    return Path(path)

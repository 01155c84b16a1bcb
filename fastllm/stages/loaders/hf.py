"""`loader="transformers"`: any HF causal LM through AutoModelForCausalLM. Correct, slower.

The HF model keeps its own cache per sequence (a DynamicCache) and runs sequences one at a
time; it plugs into the same engine, batcher and sampler as fastllm's own models.
"""
from __future__ import annotations

import inspect
import weakref
from pathlib import Path

import torch
from torch import nn

from ...core.request import Status
from ...errors import ModelNotFoundError
from ..base import LoadContext, LoadedModel
from .common import eos_token_ids, load_tokenizer, max_model_len
from .safetensors import weight_files


class HFCausalLM(nn.Module):
    """Adapter: fastllm's model interface over an HF causal LM. `forward` returns logits."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        self.config = hf.config  # the engine reads vocab_size from model.config, as for its own models
        # transformers 5.x renamed forward's past_key_values to cache (the old name goes in 5.40)
        params = inspect.signature(hf.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        cfg = hf.config
        heads = cfg.num_attention_heads
        self._shape = (cfg.num_hidden_layers, heads, getattr(cfg, "num_key_value_heads", None) or heads,
                       getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)

    @property
    def attn_shape(self) -> tuple[int, int, int, int]:
        return self._shape

    def init_buffers(self) -> None:
        pass

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        from transformers import DynamicCache

        for req in [r for r in self.caches if r.status == Status.FINISHED]:
            del self.caches[req]
        out, off = [], 0
        batch = ctx.batch
        for req, start, n in zip(batch.requests, batch.start, batch.num_new):
            if start == 0 or req not in self.caches:
                self.caches[req] = DynamicCache()
            ids = input_ids[off:off + n][None]
            pos = positions[off:off + n][None]
            res = self.hf(input_ids=ids, position_ids=pos, use_cache=True, **{self._cache_kw: self.caches[req]})
            out.append(res.logits[0])
            off += n
        return torch.cat(out)  # [T, V]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float()


class TransformersLoader:
    api_version = 1

    def load(self, model: str | None, ctx: LoadContext) -> LoadedModel:
        if model is None:
            raise ModelNotFoundError("loader='transformers' needs a model directory")
        path = Path(model).expanduser()
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is not an HF model directory (no config.json)")
        files = weight_files(path, ctx.allow_pickle)  # refuses pickle unless allowed
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=ctx.dtype, use_safetensors=files[0].suffix == ".safetensors")
        hf = hf.to(ctx.device).eval().requires_grad_(False)
        tok = load_tokenizer(ctx.tokenizer or path)
        return LoadedModel(HFCausalLM(hf), tok, eos_token_ids(hf.config, path, tok),
                           max_model_len(hf.config), path.name)

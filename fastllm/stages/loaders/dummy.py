"""`loader="dummy"`: random weights with the exact shapes of real checkpoints, for benchmarks
(speed does not depend on the values). No tokenizer: prompts are token ids."""
from __future__ import annotations

import torch

from ...errors import ConfigError
from ..base import LoadContext, LoadedModel
from .common import build_model, max_model_len

_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=_LLAMA3_SCALING, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         tie_word_embeddings=True),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                         tie_word_embeddings=True),
}


def shape_config(name: str):
    """An HF config with the named checkpoint's shapes."""
    from transformers import AutoConfig

    key = name.removeprefix("dummy:")
    if key not in SHAPES:
        raise ConfigError(f"unknown dummy shape {name!r}; known shapes: {sorted(SHAPES)}")
    kw = dict(SHAPES[key])
    if "rope_scaling" in kw:  # transformers 4.x and 5.x both accept rope_scaling with rope_theta
        kw["rope_scaling"] = dict(kw["rope_scaling"], rope_theta=kw["rope_theta"])
    return AutoConfig.for_model(**kw)


class DummyLoader:
    api_version = 1

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed, self.std = seed, std

    def load(self, model: str | None, ctx: LoadContext) -> LoadedModel:
        cfg = shape_config(model or "smollm2-135m")
        net = build_model(cfg, ctx)
        g = torch.Generator(device=ctx.device).manual_seed(self.seed)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, self.std, generator=g)
        # no EOS: the config's eos_token_id is transformers' default, not the checkpoint's, and a
        # random model that emits it would end benchmark requests early at random
        return LoadedModel(net, None, set(), max_model_len(cfg), f"dummy:{model or 'smollm2-135m'}")

"""Test helpers shared across the suite: tiny random HF checkpoints and HF reference outputs."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

# Small enough that a forward pass takes milliseconds on a CPU, big enough to exercise GQA.
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, max_position_embeddings=256,
            rms_norm_eps=1e-6, initializer_range=0.05,
            # no EOS: greedy runs of fastllm (ignore_eos) and HF (min_new_tokens) stay comparable
            bos_token_id=None, eos_token_id=None, pad_token_id=None)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 10000.0}


def tiny_config(family: str, **overrides):
    """An HF config of `family` (llama, mistral, qwen2, qwen3) with TINY sizes."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    kw = dict(TINY)
    if family == "qwen3":
        kw["head_dim"] = 16  # Qwen3Config defaults to 128
    kw.update(overrides)
    cfg = classes[family](**kw)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def make_tiny_model(tmp_path: Path, family: str, seed: int = 0, **overrides) -> Path:
    """Write a tiny random HF checkpoint (safetensors) of `family` under tmp_path; return its dir.

    Norm weights and biases are randomized too, so a model that skips one of them differs."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    tag = "-".join(f"{k}" for k in sorted(overrides)) or "plain"
    out = Path(tmp_path) / f"{family}-{tag}-{seed}"
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(str(out), **kwargs)
    return out


def load_hf(model_dir: Path):
    """The HF transformers model of a checkpoint directory, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """HF logits [T, V] at every position of one sequence."""
    return model(torch.tensor([token_ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(model, token_ids: list[int], n: int) -> list[int]:
    """HF generate's greedy continuation of exactly n tokens."""
    out = model.generate(torch.tensor([token_ids]), attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=n, min_new_tokens=n,
                         pad_token_id=model.config.pad_token_id or 0)
    return out[0, len(token_ids):].tolist()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4) -> None:
    """Max abs difference within rtol of the logit scale, and the same argmax at every position."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = max(1.0, ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= rtol * scale, f"max |diff| {diff:.3g} > {rtol * scale:.3g} (logit scale {scale:.3g})"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1)), "argmax differs"

"""Quantize once, load fast: a quantized model saved as an HF-style directory (config.json,
tokenizer files, model.safetensors holding fastllm's quantized tensors, and
fastllm_quantization.json naming the quantizer). The safetensors loader recognises the file,
rebuilds the quantized layers with empty tensors and fills them: no quantization at start-up."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ... import registry
from ...errors import CheckpointError
from ..base import LoadContext

QUANT_FILE = "fastllm_quantization.json"
FORMAT = 1


def save_quantized(model: nn.Module, tokenizer, spec: dict, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `model` (fastllm's model, already quantized by `spec` = {"name": ..., options}; "none"
    for a model only pruned). `extra` goes into the JSON file too (the pruner, for the record)."""
    from safetensors.torch import save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"))  # tied tensors (lm_head = embeddings) stored once
    dtype = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")
    meta = {"format": FORMAT, "quantizer": spec, "dtype": dtype} | (extra or {})
    (out / QUANT_FILE).write_text(json.dumps(meta, indent=1))
    return out


def load_quantized(path: Path, hf_config, ctx: LoadContext) -> nn.Module:
    """The saved quantized model on ctx.device (its activations in ctx.dtype)."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from ...models import model_class

    meta = json.loads((path / QUANT_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / QUANT_FILE}: format {meta.get('format')!r}, this fastllm reads {FORMAT}")
    spec = dict(meta["quantizer"])
    name = spec.pop("name")
    spec.pop("activation_aware", None)  # the structure only: the saved tensors hold the calibrated scales
    spec.pop("smooth", None)  # (and the smoothed norms and weights)
    with torch.device("meta"):
        model = model_class(hf_config)(hf_config).to(dtype=ctx.dtype)
        registry.create("quantizer", name, spec).apply(model, LoadContext(torch.device("meta"), ctx.dtype))
    model = model.to_empty(device=ctx.device)
    model.tie_weights()  # tied embeddings were saved once: filling one name fills both
    tied = {"model.embed_tokens.weight", "lm_head.weight"} if getattr(model, "tie_word_embeddings", False) else set()
    file = path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:  # per-layer input scales exist where calibration kept them
        for key in f.keys():
            if key.endswith(".inv_input_scale"):
                owner, _, attr = key.rpartition(".")
                model.get_submodule(owner).register_buffer(attr, torch.empty(f.get_slice(key).get_shape(),
                                                                             dtype=ctx.dtype, device=ctx.device))
    missing, unexpected = load_model(model, str(file), strict=False, device=str(ctx.device))
    missing = [k for k in missing if not k.endswith("inv_freq") and k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match a {name}-quantized {type(model).__name__}: "
                              f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.init_buffers()
    return model.eval().requires_grad_(False)

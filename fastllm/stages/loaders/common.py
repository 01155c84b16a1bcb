"""What the loaders share: building fastllm's model on a device and reading HF side files."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ...errors import CheckpointError
from ...models import model_class
from ..base import LoadContext


def build_model(hf_config, ctx: LoadContext) -> nn.Module:
    """fastllm's model for this config, parameters allocated (uninitialised) on ctx.device."""
    cls = model_class(hf_config)
    with torch.device("meta"):
        model = cls(hf_config)
    model = model.to(dtype=ctx.dtype).to_empty(device=ctx.device)
    model.init_buffers()
    return model.eval().requires_grad_(False)


def fill_model(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Load every parameter from `weights`, or raise CheckpointError naming what is missing."""
    seen: set[str] = set()

    def record() -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            seen.add(name)
            yield name, tensor

    with torch.no_grad():
        filled = model.load_weights(record())
    missing = sorted(set(dict(model.named_parameters())) - filled)
    if missing:
        # name the checkpoint tensors (k_proj), not the fused parameter they fill (qkv_proj)
        names = getattr(model, "checkpoint_names", lambda p: [p])
        absent = sorted(n for p in missing for n in names(p) if n not in seen) or missing
        raise CheckpointError(f"{source} lacks {len(absent)} tensor(s) the model needs, e.g. {absent[:4]}")


def load_tokenizer(path: str | Path | None):
    """The tokenizer in `path`, or None when the directory has none (token-id prompts only)."""
    if path is None:
        return None
    p = Path(path)
    if p.is_dir() and not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def eos_token_ids(hf_config, model_dir: Path | None, tokenizer) -> set[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer, merged."""
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(i for i in v if isinstance(i, int))

    add(getattr(hf_config, "eos_token_id", None))
    if model_dir is not None and (model_dir / "generation_config.json").exists():
        from transformers import GenerationConfig

        add(GenerationConfig.from_pretrained(str(model_dir)).eos_token_id)
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids


def max_model_len(hf_config) -> int:
    n = int(getattr(hf_config, "max_position_embeddings", 2048) or 2048)
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        n = min(n, int(window))  # no sliding-window attention yet: stay inside the window
    return n

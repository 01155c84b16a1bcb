"""`loader="auto"`: pick a loader from what the model argument points at."""
from __future__ import annotations

from pathlib import Path

from ...errors import ModelNotFoundError


def choose_loader(model: str | None) -> str:
    if model is None or model.endswith(".gguf"):
        return "gguf"
    if model.startswith("dummy:"):
        return "dummy"
    p = Path(model).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        import torch
        from transformers import AutoConfig

        from ...errors import UnsupportedModelError
        from ...models import model_class

        cfg = AutoConfig.from_pretrained(str(p))
        try:  # the architecture alone is not enough: a RoPE type or activation may be unsupported
            with torch.device("meta"):  # no memory: shapes only
                net = model_class(cfg)(cfg)
            net.init_buffers()  # raises for an unsupported RoPE type
            return "safetensors"
        except UnsupportedModelError:
            return "transformers"
    if p.is_dir() and any(p.glob("*.gguf")):
        return "gguf"
    raise ModelNotFoundError(
        f"{model!r} is not an HF model directory (with config.json), a .gguf file, or 'dummy:<shape>'")

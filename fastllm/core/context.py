"""Where an engine runs and in what precision: the device, the dtype and the LoadContext the
stages share, resolved once from an EngineConfig (by the Engine, and by `fastllm quantize` /
`fastllm prune`, which load and transform a model without serving it)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import EngineConfig
from ..errors import ConfigError
from ..stages.base import LoadContext

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), where it halves the bytes
    each decode step reads; fp32 on other CPUs, where bf16 would be emulated."""
    if device.type == "cuda":
        return torch.bfloat16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32


def resolve_device(name: str) -> torch.device:
    """"auto": CUDA where there is one, else the CPU; a CUDA device asked for without CUDA: ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available; use device='cpu'")
    return dev


def load_context(config: EngineConfig) -> LoadContext:
    """The LoadContext of config: its device and dtype resolved, its cache directory (default:
    fastllm's cache under the user's home)."""
    from ..stages.loaders.gguf import default_cache_dir

    device = resolve_device(config.device)
    cache = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    return LoadContext(device, DTYPES.get(config.dtype) or default_dtype(device), config.allow_pickle, cache,
                       config.progress, config.tokenizer)


def load_model(config: EngineConfig, ctx: LoadContext):
    """config's model through its loader ("auto": chosen from the model's name); ctx learns its
    tokenizer, for the stages that calibrate on text. Returns the loader's LoadedModel."""
    from .. import registry
    from ..stages.loaders.auto import choose_loader

    loader = choose_loader(config.model) if config.loader.name == "auto" else config.loader.name
    model_arg = config.model.removeprefix("dummy:") if config.model else None
    loaded = registry.create("loader", loader, config.loader.options).load(model_arg, ctx)
    ctx.text_tokenizer = loaded.tokenizer
    return loaded

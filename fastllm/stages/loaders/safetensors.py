"""`loader="safetensors"`: an HF model directory (config.json, one or sharded *.safetensors,
tokenizer files). Tensors are read through mmap straight onto the target device."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ...errors import CheckpointError, ModelNotFoundError, UnsafeCheckpointError
from ..base import LoadContext, LoadedModel
from .common import build_model, eos_token_ids, fill_model, load_tokenizer, max_model_len

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# pickles in HF and Trainer directories that are not weights (rng_state*.pth too)
NOT_WEIGHTS = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")


def _indexed(path: Path, index: Path) -> list[Path]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index} is not a valid weight index: {e}") from e
    files = [path / n for n in names]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ModelNotFoundError(f"{index.name} lists shard(s) missing from {path}: {missing}")
    return files


def weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    """The weight files of an HF directory: the index's shards, model.safetensors, or (when
    allowed) pickle weights. Other *.safetensors beside them (consolidated.safetensors of
    Mistral repos, adapters) are not the transformers checkpoint and are ignored."""
    if (path / "model.safetensors.index.json").exists():
        return _indexed(path, path / "model.safetensors.index.json")
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(f for f in path.iterdir()
                     if f.suffix in PICKLE_SUFFIXES and f.name not in NOT_WEIGHTS and not f.name.startswith("rng_state"))
    if pickles and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{path} has only pickle weights ({pickles[0].name}); loading pickle can execute code. "
            "Convert them to safetensors, or pass allow_pickle=True if you trust the source"
        )
    if (path / "pytorch_model.bin.index.json").exists():
        return _indexed(path, path / "pytorch_model.bin.index.json")
    if pickles:
        return [f for f in pickles if f.name.startswith("pytorch_model")] or pickles
    raise ModelNotFoundError(f"no weights in {path}: expected model.safetensors or sharded *.safetensors")


def iter_tensors(files: list[Path], device: torch.device, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    bar = tqdm(total=len(files), desc="Loading weights", unit="file", disable=not progress)
    for f in files:
        if f.suffix in PICKLE_SUFFIXES:  # allowed explicitly by the user
            try:
                state = torch.load(f, map_location=device, weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001 - unpickling fails in many ways; all mean unusable
                raise CheckpointError(f"{f} is not a loadable torch checkpoint: {type(e).__name__}: {e}") from e
            if not isinstance(state, dict):
                raise CheckpointError(f"{f} holds a {type(state).__name__}, not a state dict of tensors")
            yield from state.items()
        else:
            try:
                with safe_open(str(f), framework="pt", device=str(device)) as sf:
                    for name in sf.keys():
                        yield name, sf.get_tensor(name)
            except SafetensorError as e:
                raise CheckpointError(f"{f} is not a valid safetensors file: {e}") from e
        bar.update(1)
    bar.close()


class SafetensorsLoader:
    api_version = 1

    def load(self, model: str | None, ctx: LoadContext) -> LoadedModel:
        if model is None:
            raise ModelNotFoundError("loader='safetensors' needs a model directory")
        path = Path(model).expanduser()
        if not path.is_dir():
            raise ModelNotFoundError(f"model directory {path} does not exist")
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} has no config.json; an HF model directory needs one")
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(path))
        from ..quantizers.saved import QUANT_FILE, load_quantized

        if (path / QUANT_FILE).exists():  # saved by `fastllm quantize`: no quantizing at start-up
            net = load_quantized(path, hf_config, ctx)
        else:
            files = weight_files(path, ctx.allow_pickle)
            net = build_model(hf_config, ctx)
            fill_model(net, iter_tensors(files, ctx.device, ctx.progress), str(path))
        tok = load_tokenizer(ctx.tokenizer or path)
        return LoadedModel(net, tok, eos_token_ids(hf_config, path, tok), max_model_len(hf_config), path.name)

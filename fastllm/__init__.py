"""fastllm: an embeddable SDK that makes open LLMs generate fast on your own GPUs.

    from fastllm import Engine, SamplingParams
    with Engine() as engine:
        print(engine.generate("The capital of France is")[0].text)
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "SamplingParams", "RequestOutput", "StreamChunk", "errors"]

if TYPE_CHECKING:
    from .config import EngineConfig
    from .engine import Engine
    from .outputs import RequestOutput, StreamChunk
    from .sampling import SamplingParams

_LAZY = {"Engine": ".engine", "EngineConfig": ".config", "SamplingParams": ".sampling",
         "RequestOutput": ".outputs", "StreamChunk": ".outputs"}


def __getattr__(name: str):
    # `import fastllm` stays fast: torch and transformers load only when Engine is used.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    if name == "errors":
        from . import errors

        return errors
    raise AttributeError(f"module 'fastllm' has no attribute {name!r}")

"""The conformance kit: checks that every stage implementation, built-in or third-party, passes.

A plugin's own test suite calls them with plain pytest (or anything else; they raise
AssertionError with a message that says what broke):

    from fastllm.testing import check_stage, check_model_transform
    check_stage("pruner", "mypruner", {"amount": 0.3})
    check_model_transform(MyPruner(amount=0.3), "pruner", max_rel_error=0.5)

`check_stage(stage, name, options, **kw)` loads a registered stage through the registry (entry
point, api_version) and runs the check of its stage: check_loader, check_model_transform,
check_attention, check_batcher or check_speculator. Importing this package is cheap; torch
loads with the first check.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .api import check_api_version

if TYPE_CHECKING:
    from .attention import check_attention
    from .batchers import TrackingAttention, check_batcher
    from .loaders import check_loader
    from .models import cpu_context, model_logits, tiny_checkpoint, tiny_llama, tiny_llama_config
    from .reference import ReferenceAttention, eager_attention, fake_request
    from .speculators import check_speculator
    from .transforms import check_model_transform

_LAZY = {
    "check_attention": ".attention", "check_batcher": ".batchers", "TrackingAttention": ".batchers",
    "check_loader": ".loaders", "check_model_transform": ".transforms", "check_speculator": ".speculators",
    "cpu_context": ".models", "model_logits": ".models", "tiny_llama": ".models", "tiny_llama_config": ".models",
    "tiny_checkpoint": ".models",
    "ReferenceAttention": ".reference", "eager_attention": ".reference", "fake_request": ".reference",
}
__all__ = ["check_api_version", "check_stage", *_LAZY]
TRANSFORMS = ("quantizer", "pruner", "parallelizer")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'fastllm.testing' has no attribute {name!r}")


def check_stage(stage: str, name: str, options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Load `name` of `stage` through the registry with `options` and run its stage's check.

    kwargs go to that check: loaders need `model_arg` (and may take `ctx`); transforms may take
    `ctx`, `model` and `max_rel_error`; attention takes `dtype`, `device`, `atol`; batchers
    `max_num_seqs`, `max_num_batched_tokens`, `attention`; speculators `vocab_size`.
    Returns what the stage's check returns."""
    from .. import registry

    check_api_version(registry.load(stage, name), stage)
    obj = registry.create(stage, name, options)
    if stage == "loader":
        kwargs = dict(kwargs)
        return __getattr__("check_loader")(obj, kwargs.pop("model_arg", None), **kwargs)
    if stage in TRANSFORMS:
        return __getattr__("check_model_transform")(obj, stage, **kwargs)
    check = {"attention": "check_attention", "batcher": "check_batcher", "speculator": "check_speculator"}
    assert stage in check, f"unknown stage {stage!r}; stages are {sorted(registry.GROUPS)}"
    return __getattr__(check[stage])(obj, **kwargs)

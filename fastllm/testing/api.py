"""What every stage must carry: the api_version this fastllm speaks and its protocol's methods."""
from __future__ import annotations

from typing import Any

from .. import registry

METHODS: dict[str, tuple[str, ...]] = {
    "loader": ("load",),
    "quantizer": ("apply",),
    "pruner": ("apply",),
    "parallelizer": ("apply",),
    "attention": ("setup", "can_allocate", "allocate", "free", "plan", "forward"),
    "batcher": ("setup", "add", "schedule", "update", "finish", "has_work", "requests"),
    "speculator": ("propose",),
}


def check_api_version(stage_obj: Any, stage: str) -> None:
    """`stage_obj` (a class or an instance) declares api_version == fastllm.registry.API_VERSION
    and has every method of the `stage` protocol."""
    assert stage in METHODS, f"unknown stage {stage!r}; stages are {sorted(METHODS)}"
    what = getattr(stage_obj, "__name__", type(stage_obj).__name__)
    got = getattr(stage_obj, "api_version", None)
    assert type(got) is int and got == registry.API_VERSION, (
        f"{stage} {what} declares api_version={got!r}; set the class attribute "
        f"api_version = {registry.API_VERSION} (an int)")
    missing = [m for m in METHODS[stage] if not callable(getattr(stage_obj, m, None))]
    assert not missing, f"{stage} {what} lacks the protocol method(s) {missing}"

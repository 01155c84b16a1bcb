"""The stage registry: entry points per group, imported only when chosen.

Discovery reads names and distributions only. A plugin module is imported when a stage of
that name is built. Duplicate names, failing imports and wrong `api_version` raise typed errors
that name the distribution; nothing is silently skipped. `FASTLLM_PLUGINS` (comma-separated
distribution or stage names) restricts which third-party distributions may load.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from .errors import ConfigError, DuplicatePluginError, PluginLoadError, UnknownPluginError

API_VERSION = 1

GROUPS: dict[str, str] = {
    "loader": "fastllm.loaders",
    "quantizer": "fastllm.quantizers",
    "pruner": "fastllm.pruners",
    "parallelizer": "fastllm.parallelizers",
    "attention": "fastllm.attention",
    "batcher": "fastllm.batchers",
    "speculator": "fastllm.speculators",
}
BUILTIN_DIST = "fastllm"


@dataclass(frozen=True)
class PluginInfo:
    stage: str
    name: str
    target: str  # "module:attr"
    dist: str
    version: str

    @property
    def builtin(self) -> bool:
        return self.dist == BUILTIN_DIST


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    d = ep.dist
    return (d.metadata["Name"], d.version) if d is not None else ("<unknown>", "?")


def _allowed(info: PluginInfo) -> bool:
    allow = os.environ.get("FASTLLM_PLUGINS")
    if info.builtin or not allow:
        return True
    names = {a.strip() for a in allow.split(",") if a.strip()}
    return info.dist in names or info.name in names


@lru_cache(maxsize=None)
def discover(stage: str) -> dict[str, PluginInfo]:
    """All registered implementations of one stage, by name (nothing is imported)."""
    if stage not in GROUPS:
        raise ConfigError(f"unknown stage {stage!r}; stages are {sorted(GROUPS)}")
    found: dict[str, PluginInfo] = {}
    for ep in entry_points(group=GROUPS[stage]):
        dist, version = _dist_of(ep)
        info = PluginInfo(stage, ep.name, ep.value, dist, version)
        if not _allowed(info):
            continue
        prev = found.get(ep.name)
        if prev is not None and (prev.dist, prev.target) != (dist, ep.value):
            raise DuplicatePluginError(
                f"{stage} {ep.name!r} is registered twice: by {prev.dist} {prev.version} "
                f"({prev.target}) and by {dist} {version} ({ep.value}); uninstall one of them"
            )
        found[ep.name] = info
    return found


def names(stage: str) -> list[str]:
    return sorted(discover(stage))


def load(stage: str, name: str) -> type:
    """Import the class registered as `name` in `stage` and check its api_version."""
    plugins = discover(stage)
    if name not in plugins:
        raise UnknownPluginError(
            f"no {stage} named {name!r}; valid {stage} names: {sorted(plugins)} "
            f"(`fastllm plugins` lists them with their packages)"
        )
    info = plugins[name]
    module_name, _, attr = info.target.partition(":")
    try:
        import importlib

        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # noqa: BLE001 - any import failure is reported with its plugin
        raise PluginLoadError(
            f"{stage} {name!r} from {info.dist} {info.version} failed to load "
            f"({info.target}): {type(e).__name__}: {e}"
        ) from e
    got = getattr(obj, "api_version", None)
    if got != API_VERSION:
        raise PluginLoadError(
            f"{stage} {name!r} from {info.dist} {info.version} declares api_version={got!r}; "
            f"this fastllm needs api_version={API_VERSION}"
        )
    return obj


def create(stage: str, name: str, options: dict[str, Any] | None = None) -> Any:
    """Build a stage instance from its name and options."""
    cls = load(stage, name)
    try:
        return cls(**(options or {}))
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # an unknown option, or a value the stage refuses
        raise ConfigError(f"{stage} {name!r} rejected its options {options or {}}: {e}") from e

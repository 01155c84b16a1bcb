"""fastllm.kernels.launch.autotune: picks cached on disk unless FASTLLM_AUTOTUNE_CACHE=0."""
from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")
launch = pytest.importorskip("fastllm.kernels.launch")


@pytest.mark.parametrize("enabled", [True, False])
def test_autotune_asks_triton_to_cache_picks_unless_switched_off(monkeypatch, enabled):
    calls = []

    def fake_autotune(configs, key, prune_configs_by=None, reset_to_zero=None, cache_results=False):
        calls.append(dict(configs=configs, key=key, reset_to_zero=reset_to_zero, cache_results=cache_results))
        return lambda fn: fn

    monkeypatch.setattr(triton, "autotune", fake_autotune)
    monkeypatch.setattr(launch, "AUTOTUNE_CACHE", enabled)
    configs = [triton.Config({"BLOCK": 16})]
    assert launch.autotune(configs, key=["N"], reset_to_zero=["y"])("kernel") == "kernel"
    assert calls == [dict(configs=configs, key=["N"], reset_to_zero=["y"], cache_results=enabled)]


def test_autotune_without_a_disk_cache_in_triton(monkeypatch):
    calls = []
    monkeypatch.setattr(triton, "autotune", lambda configs, key: calls.append(key) or (lambda fn: fn))
    monkeypatch.setattr(launch, "AUTOTUNE_CACHE", True)
    launch.autotune([], key=["N"])
    assert calls == [["N"]]


def test_the_switch_reads_the_environment(monkeypatch):
    import importlib

    monkeypatch.setenv("FASTLLM_AUTOTUNE_CACHE", "0")
    try:
        assert importlib.reload(launch).AUTOTUNE_CACHE is False
        monkeypatch.setenv("FASTLLM_AUTOTUNE_CACHE", "1")
        assert importlib.reload(launch).AUTOTUNE_CACHE is True
    finally:
        monkeypatch.delenv("FASTLLM_AUTOTUNE_CACHE")
        importlib.reload(launch)

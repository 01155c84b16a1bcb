"""The example plugin passes fastllm's conformance kit and does what it says."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastllm import registry
from fastllm.config import EngineConfig
from fastllm.errors import ConfigError
from fastllm.testing import check_model_transform, check_stage, cpu_context, tiny_llama
from fastllm_example_plugin import ThresholdPruner


def test_registered_through_its_entry_point():
    info = registry.discover("pruner")["example-threshold"]
    assert (info.dist, info.builtin) == ("fastllm-example-plugin", False)
    assert registry.load("pruner", "example-threshold") is ThresholdPruner


def test_conformance():
    check_stage("pruner", "example-threshold", {"threshold": 0.02})


def test_conformance_in_bfloat16():
    check_model_transform(ThresholdPruner(0.02), "pruner", cpu_context(torch.bfloat16))


def test_zeroes_exactly_the_small_linear_weights():
    model = tiny_llama()
    before = {n: p.clone() for n, p in model.named_parameters()}
    ThresholdPruner(threshold=0.05).apply(model, cpu_context())
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linear
    for name, p in model.named_parameters():
        old = before[name]
        if name in linear:
            small = old.abs() < 0.05
            assert small.any() and (p[small] == 0).all() and torch.equal(p[~small], old[~small])
        else:  # embeddings and norms are not nn.Linear: untouched
            assert torch.equal(p, old)


def test_too_high_a_threshold_fails_the_closeness_check():
    with pytest.raises(AssertionError, match="relative error"):
        check_model_transform(ThresholdPruner(threshold=10.0), "pruner")


@pytest.mark.parametrize("bad", [-0.1, "0.1", True])
def test_a_bad_threshold_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="threshold"):
        registry.create("pruner", "example-threshold", {"threshold": bad})


def test_engine_config_accepts_it():
    cfg = EngineConfig(pruner={"name": "example-threshold", "threshold": 0.01})
    assert (cfg.pruner.name, cfg.pruner.options) == ("example-threshold", {"threshold": 0.01})

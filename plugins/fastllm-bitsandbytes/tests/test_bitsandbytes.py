"""bnb-int8 and bnb-nf4: registered by entry point, a clear error without bitsandbytes, and the
conformance kit plus the real model where bitsandbytes is installed (skipped elsewhere)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from fastllm import registry
from fastllm.errors import ConfigError
from fastllm.stages.base import LoadContext
from fastllm.testing import check_model_transform

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.parametrize("name", ["bnb-int8", "bnb-nf4"])
def test_registered_through_their_entry_points(name):
    info = registry.discover("quantizer")[name]
    assert (info.dist, info.builtin) == ("fastllm-bitsandbytes", False)


@pytest.mark.skipif(HAVE_BNB, reason="bitsandbytes is installed here")
def test_without_bitsandbytes_the_error_says_what_is_missing():
    from fastllm.testing import tiny_llama

    ctx = LoadContext(torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        registry.create("quantizer", "bnb-int8").apply(tiny_llama(ctx), ctx)


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="quant_type"):
        registry.create("quantizer", "bnb-nf4", {"quant_type": "int3"})
    with pytest.raises(ConfigError, match="skip"):
        registry.create("quantizer", "bnb-int8", {"skip": "lm_head"})


@pytest.mark.skipif(not HAVE_BNB, reason="needs bitsandbytes")
@pytest.mark.parametrize("name, bound", [("bnb-int8", 0.05), ("bnb-nf4", 0.3)])
def test_conformance(name, bound):
    ctx = LoadContext(torch.device("cuda" if torch.cuda.is_available() else "cpu"), torch.float32)
    check_model_transform(registry.create("quantizer", name), "quantizer", ctx, max_rel_error=bound)

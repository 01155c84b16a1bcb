"""The flash-attn backend: registered by entry point, clear errors where it cannot run, and the
conformance kit where flash-attn and CUDA are both present (skipped elsewhere)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from fastllm import registry
from fastllm.errors import ConfigError
from fastllm.stages.base import KVSpec

HAVE_FLASH = importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def test_registered_through_its_entry_point():
    info = registry.discover("attention")["flash-attn"]
    assert (info.dist, info.builtin) == ("fastllm-flash-attn", False)


@pytest.mark.skipif(HAVE_FLASH, reason="flash-attn is installed here")
def test_without_flash_attn_or_cuda_the_error_says_what_is_missing():
    backend = registry.create("attention", "flash-attn")
    spec = KVSpec(2, 4, 2, 64, torch.bfloat16, torch.device("cuda" if torch.cuda.is_available() else "cpu"), 0.125)
    with pytest.raises(ConfigError, match="flash-attn|CUDA"):
        backend.setup(spec)


def test_block_size_must_suit_flash_attn():
    with pytest.raises(ConfigError, match="multiple of 256"):
        b = registry.create("attention", "flash-attn", {"block_size": 16})
        b.setup(KVSpec(2, 4, 2, 64, torch.bfloat16, torch.device("cuda"), 0.125))


@pytest.mark.skipif(not HAVE_FLASH, reason="needs flash-attn and CUDA")
def test_conformance_against_the_reference():
    from fastllm.testing import check_attention

    # flash-attn computes in bf16/fp16 only, with head sizes it supports
    check_attention(registry.create("attention", "flash-attn", {"kv_cache_memory": 1 << 28}),
                    head_dim=64, dtype=torch.bfloat16, device="cuda")

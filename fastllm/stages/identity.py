"""The baselines of the transform stages and speculation: they change nothing."""
from __future__ import annotations

from torch import nn

from .base import LoadContext


class _Identity:
    api_version = 1

    def apply(self, model: nn.Module, ctx: LoadContext) -> nn.Module:
        return model


class NoQuantizer(_Identity):
    """`quantizer="none"`: weights stay in the engine's dtype."""


class NoPruner(_Identity):
    """`pruner="none"`: every weight is kept."""


class SingleDevice(_Identity):
    """`parallelizer="single"`: the whole model on one device."""


class NoSpeculator:
    """`speculator="none"`: one token per request per step."""

    api_version = 1
    enabled = False

    def propose(self, requests) -> dict[str, list[int]]:
        return {}

"""`pruner={"name": "example-threshold", "threshold": 0.01}`: zero every nn.Linear weight whose
magnitude is below `threshold`. An example of a third-party fastllm stage."""
from __future__ import annotations

from fastllm.errors import ConfigError

__version__ = "0.1.0"


class ThresholdPruner:
    """A fastllm ModelTransform in the `fastllm.pruners` group."""

    api_version = 1  # the stage API this plugin was written against (fastllm.registry.API_VERSION)

    def __init__(self, threshold: float = 1e-3):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ConfigError(f"example-threshold: threshold must be a number >= 0, got {threshold!r}")
        self.threshold = float(threshold)

    def apply(self, model, ctx):
        import torch
        from torch import nn

        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    w = module.weight  # [out, in]
                    w.masked_fill_(w.abs() < self.threshold, 0.0)
        return model

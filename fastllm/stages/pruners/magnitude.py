"""`pruner="magnitude"`: unstructured pruning of the smallest weights by absolute value."""
from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from ..base import LoadContext
from ..quantizers import check_skip
from . import apply_mask, check_sparsity, global_threshold, layer_mask, prunable, report, row_mask

SCOPES = ("layer", "row", "global")


class MagnitudePruner:
    """`{"name": "magnitude", "sparsity": 0.5, "scope": "layer"}`: zero the `sparsity` fraction of
    smallest |w| in each linear layer (`scope="layer"`, as the Wanda paper's magnitude baseline),
    in each output row (`"row"`), or over all pruned layers together (`"global"`). `skip`: module-name
    patterns left dense (default the LM head)."""

    api_version = 1

    def __init__(self, sparsity: float = 0.5, scope: str = "layer", skip: list[str] | tuple[str, ...] = ("lm_head",)):
        self.sparsity = check_sparsity("magnitude pruner", sparsity)
        if scope not in SCOPES:
            raise ConfigError(f"magnitude pruner: scope is one of {list(SCOPES)}, got {scope!r}")
        self.scope = scope
        self.skip = check_skip("magnitude pruner", skip)

    def apply(self, model: nn.Module, ctx: LoadContext) -> nn.Module:
        layers = [layer for _, layer in prunable(model, self.skip)]
        if self.scope == "global":
            t = global_threshold([layer.weight.detach().abs().float() for layer in layers], self.sparsity)
            for layer in layers:
                apply_mask(layer, layer.weight.detach().abs().float() > t)
        else:
            pick = layer_mask if self.scope == "layer" else row_mask
            for layer in layers:
                apply_mask(layer, pick(layer.weight.detach().abs().float(), self.sparsity))
        report(model, layers, f"magnitude pruner ({self.scope})")
        return model

"""CPU weight layout: oneDNN pre-packed linear layers.

A plain `F.linear` on the CPU re-lays the weight out for oneDNN on every call; at batch 1 that
costs about as much as the product itself (SmolLM2's 49152x576 lm_head: 11.6 ms in fp32, 6.2 ms
pre-packed, on 2 cores). Packing once at start-up removes it.
"""
from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """An inference-only nn.Linear whose weight oneDNN has packed for this CPU."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1),
                             persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def can_pack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_linears(model: nn.Module) -> int:
    """Swap every plain nn.Linear (not subclasses: quantized layers keep theirs) for PackedLinear."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)

"""Linear layers that take fastllm's Triton GEMV when one token passes through (batch-1
decode) and cuBLAS otherwise: a model transform applied on CUDA."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DecodeLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and x.dim() == 2 and self.weight.dtype == x.dtype:
            from ..kernels.gemv import gemv

            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_gemv(model: nn.Module) -> nn.Module:
    """Turn every plain nn.Linear of `model` into a DecodeLinear, in place (weights shared)."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = DecodeLinear
    return model

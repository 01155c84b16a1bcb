"""Linear layers that take fastllm's Triton GEMV when one token passes through (batch-1
decode) and cuBLAS otherwise: a model transform applied on CUDA. At one token the GEMV also
absorbs the small op before the layer (RMSNorm with its residual add, or SiLU-and-mul)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DecodeLinear(nn.Linear):
    devices = ("cuda",)  # tests add "cpu" to run the kernels in Triton's interpreter
    # Take the RMSNorm before the layer into the GEMV: off, since the GEMVs request weights before
    # the PDL wait. Then a separate norm kernel hides under the next GEMV's first loads, and the
    # fused one (x, residual and norm weight re-read by every program) was slower: 201.9 against
    # 191.2 tok/s (H100, Llama-2-7B shape, scripts/profile_decode.py, 2026-11-27).
    fuse_norm = False
    fuse_silu_mul = True  # take SiLU-and-mul before the layer into the GEMV

    def _one_token(self, x: torch.Tensor) -> bool:
        return (x.dim() == 2 and x.shape[0] == 1 and x.device.type in self.devices
                and x.dtype == self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._one_token(x):
            from ..kernels.gemv import gemv

            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward_normed(self, h: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(self(RMSNorm(h + residual)), h + residual) in one kernel; None when not one token."""
        if not (self.fuse_norm and self._one_token(h)):
            return None
        from ..kernels.gemv import gemv

        if residual is None:
            return gemv(h, self.weight, self.bias, norm_weight=norm_weight, eps=eps), h
        return gemv(h, self.weight, self.bias, norm_weight=norm_weight, eps=eps, residual=residual)

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """self(silu(gate) * up) from gate_up [1, 2K] in one kernel; None when not one token."""
        if not (self.fuse_silu_mul and self._one_token(gate_up)):
            return None
        from ..kernels.gemv import gemv

        return gemv(gate_up, self.weight, self.bias, silu_mul=True)


def use_gemv(model: nn.Module) -> nn.Module:
    """Turn every plain nn.Linear of `model` into a DecodeLinear, in place (weights shared)."""
    from ..stages.quantizers import is_sparse

    for m in model.modules():
        if type(m) is nn.Linear and not is_sparse(m.weight):  # (2:4 sparse weights keep torch's kernels)
            m.__class__ = DecodeLinear
    return model

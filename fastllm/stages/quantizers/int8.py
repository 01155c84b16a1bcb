"""`quantizer="int8"`: weight-only int8 with one scale per output channel (symmetric,
q in [-127, 127], w ~ q * scale), applied by swapping nn.Linear layers.

The weights take half the bytes of bf16; the activations stay in the model dtype.
- CUDA, one token: fastllm's Triton GEMV reads the int8 rows and dequantizes in registers (with
  the RMSNorm or SiLU-and-mul before the layer folded in, as for bf16 weights);
- CPU with bf16 activations: torch's `_weight_int8pack_mm` (when in_features % 32 == 0);
- CUDA, more tokens: fastllm.kernels.qgemm, which dequantizes each weight tile in registers
  before the tensor-core product;
- otherwise (fp32 on the CPU): the weight is dequantized for the call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import LoadContext
from . import RowScaledLinear, check_skip, linears


# torch._int_mm's limits (cuBLASLt's int8 GEMM): more than 16 rows, K and N multiples of 8
INT_MM_MIN_TOKENS = 17


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) symmetric int8 quantization of activations x [M, K]:
    (q int8 [M, K], scale fp32 [M, 1]) with x ~ q * scale; one Triton kernel on CUDA."""
    if x.is_cuda:
        from ...kernels.fused import quant_int8_rows

        return quant_int8_rows(x)
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale fp32 [N]) with w ~ q * scale[:, None]; |w - q*s| <= s/2."""
    scale = w.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(RowScaledLinear):
    """A linear layer with int8 weights and per-output-channel fp32 scales."""

    quantize = staticmethod(quantize_int8)

    def __init__(self, linear: nn.Linear, dynamic_activations: bool = False):
        super().__init__(linear)
        self._scale_cache: dict[torch.dtype, torch.Tensor] = {}
        self.dynamic_activations = dynamic_activations

    def _scale_as(self, dtype: torch.dtype) -> torch.Tensor:
        s = self._scale_cache.get(dtype)
        if s is None:
            s = self._scale_cache[dtype] = self.scale.to(dtype)
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self._one_token(flat):
            out = self._gemv(flat)
        elif self.dynamic_activations and self._int_mm_fits(flat):  # W8A8 on the int8 tensor cores / AMX
            xq, x_scale = quantize_int8_rows(flat)
            acc = torch._int_mm(xq, self.qweight.t())  # int32 [M, N], exact
            out = (acc.float() * x_scale * self.scale).to(flat.dtype)
            if self.bias is not None:
                out = out + self.bias
        elif flat.device.type in self.devices:
            from ...kernels.qgemm import qgemm_rows

            out = qgemm_rows(flat, self.qweight, self.scale, self.bias)
        elif flat.device.type == "cpu" and flat.dtype == torch.bfloat16 and self.in_features % 32 == 0:
            # (torch 2.13's CPU kernel reads out of bounds when K is not a multiple of 16)
            out = torch._weight_int8pack_mm(flat, self.qweight, self._scale_as(flat.dtype))
            if self.bias is not None:
                out = out + self.bias
        else:
            out = F.linear(flat, self.dequantize(flat.dtype), self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _int_mm_fits(self, flat: torch.Tensor) -> bool:
        return flat.shape[0] >= INT_MM_MIN_TOKENS and self.in_features % 8 == 0 and self.out_features % 8 == 0

    def extra_repr(self) -> str:
        return super().extra_repr() + (", dynamic int8 activations" if self.dynamic_activations else "")


class Int8Quantizer:
    """`quantizer="int8"`, or `{"name": "int8", "skip": ["lm_head", "*.o_proj"]}`: every
    nn.Linear whose module name matches none of `skip` (fnmatch patterns; default: the LM head,
    kept in full precision) becomes an Int8Linear. Embeddings are never quantized.

    `activations="dynamic"` (W8A8): batches of 17 or more tokens also quantize their activations
    per token to int8 and multiply on the int8 tensor cores (torch._int_mm: twice bf16's peak on
    Hopper) or the CPU's int8 units; fewer tokens stay weight-only. Faster where a batch is
    compute-bound, at some quality cost (docs/quantization.md)."""

    api_version = 1

    def __init__(self, skip: list[str] | tuple[str, ...] = ("lm_head",), activations: str = "none"):
        from ...errors import ConfigError

        self.skip = check_skip("int8 quantizer", skip)
        if activations not in ("none", "dynamic"):
            raise ConfigError(f"int8 quantizer: activations is 'none' (weight-only) or 'dynamic' (per-token int8 "
                              f"activations for batches of {INT_MM_MIN_TOKENS}+ tokens), got {activations!r}")
        self.dynamic = activations == "dynamic"

    def apply(self, model: nn.Module, ctx: LoadContext) -> nn.Module:
        for parent, name, child in linears(model, self.skip):
            setattr(parent, name, Int8Linear(child, self.dynamic))
        return model

"""`quantizer="fp8"`: e4m3 weights with one fp32 scale per output channel (w ~ q * scale,
|q| <= 448), half of bf16's bytes.

- CUDA, one token: fastllm's Triton GEMV reads the fp8 rows and converts in registers;
- CUDA, a few tokens: fastllm.kernels.qgemm (weights converted to bf16 in registers);
- CUDA, `scaled_mm_min_tokens` or more: `torch._scaled_mm` on the fp8 tensor cores, with the
  activations quantized per token (dynamic scales);
- elsewhere (the CPU): the weight is dequantized for the call, and batches of
  `scaled_mm_min_tokens` or more round their activations to e4m3 per token first, as the GPU
  path does, so perplexity measured on the CPU is that of GPU batches.
fp8 needs a GPU of compute capability 8.9 or later (Ada, Hopper): on older cards it is refused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..base import LoadContext
from . import RowScaledLinear, check_skip, linears

E4M3_MAX = 448.0


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q float8_e4m3fn [N, K], scale fp32 [N]) with w ~ q * scale[:, None]."""
    scale = w.detach().float().abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX
    q = (w.detach().float() / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


class Fp8Linear(RowScaledLinear):
    quantize = staticmethod(quantize_fp8)
    # From 16 tokens up torch._scaled_mm (with the one-kernel activation quantization) beat both bf16
    # and the weight-only GEMM on the Llama-2-7B shapes (H100, scripts/quant_gpu.py, 2026-11-27)
    scaled_mm_min_tokens = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self._one_token(flat):
            out = self._gemv(flat)
        elif flat.is_cuda and self._scaled_mm_fits(flat):
            from ...kernels.fused import quant_fp8_rows

            xq, x_scale = quant_fp8_rows(flat)  # one scale per token, one kernel
            out = torch._scaled_mm(xq, self.qweight.t(), scale_a=x_scale, scale_b=self.scale[None, :],
                                   bias=self.bias, out_dtype=flat.dtype)
        elif flat.device.type in self.devices:
            from ...kernels.qgemm import qgemm_rows

            out = qgemm_rows(flat, self.qweight, self.scale, self.bias)
        else:
            if self._scaled_mm_fits(flat):  # the CPU: the activations rounded to e4m3 per token as the GPU's
                amax = flat.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)  # _scaled_mm path rounds
                xs = amax / E4M3_MAX  # them, so quality measured here is what a GPU batch computes
                flat = ((flat.float() / xs).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * xs
                        ).to(flat.dtype)
            out = F.linear(flat, self.dequantize(flat.dtype), self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _scaled_mm_fits(self, flat: torch.Tensor) -> bool:
        return (flat.shape[0] >= self.scaled_mm_min_tokens and self.in_features % 16 == 0
                and self.out_features % 16 == 0)


class Fp8Quantizer:
    """`quantizer="fp8"`, `skip`: module-name patterns kept in full precision (default the LM head)."""

    api_version = 1

    def __init__(self, skip: list[str] | tuple[str, ...] = ("lm_head",)):
        self.skip = check_skip("fp8 quantizer", skip)

    def apply(self, model: nn.Module, ctx: LoadContext) -> nn.Module:
        if ctx.device.type == "cuda" and torch.cuda.get_device_capability(ctx.device) < (8, 9):
            name = torch.cuda.get_device_name(ctx.device)
            raise ConfigError(f"fp8 needs a GPU of compute capability 8.9 or later (Ada, Hopper); {name} is "
                              f"{'.'.join(map(str, torch.cuda.get_device_capability(ctx.device)))}. Use int8 instead")
        for parent, name, child in linears(model, self.skip):
            setattr(parent, name, Fp8Linear(child))
        return model

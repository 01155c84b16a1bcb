"""`quantizer="int8"`: weight-only int8 with one scale per output channel (symmetric,
q in [-127, 127], w ~ q * scale), applied by swapping nn.Linear layers.

The weights take half the bytes of bf16; the activations stay in the model dtype.
- CUDA, one token: fastllm's Triton GEMV reads the int8 rows and dequantizes in registers (with
  the RMSNorm or SiLU-and-mul before the layer folded in, as for bf16 weights);
- CPU with bf16 activations: torch's `_weight_int8pack_mm` (when in_features % 32 == 0);
- CUDA with `activations="dynamic"` (W8A8), 17+ tokens: fastllm.kernels.w8a8 (activations
  quantized per token, int8 x int8 on the tensor cores, scales in the epilogue);
- CUDA on Hopper (compute capability 9.0, with nvcc and CUTLASS's headers), 128+ tokens, no bias:
  fastllm.kernels.cutlass_gemm, CUTLASS's mixed-input GEMM (the weight widened in registers,
  wgmma, TMA, warp-specialized), or whichever of the two paths below is faster for the shape;
- CUDA, 17-511 tokens otherwise (bf16 / fp16): fastllm.kernels.w8a8.w8a16_planes, the activations
  as two int8 planes per token (about 15 bits), the weight straight to the int8 tensor cores;
- CUDA, more tokens: fastllm.kernels.qgemm, which dequantizes each weight tile in registers
  before the tensor-core product; from `Int8Linear.dense_min_tokens` (2,048) the weight is
  dequantized in one pass (qgemm.dequantize_rows) and cuBLAS multiplies it;
- otherwise (fp32 on the CPU): the weight is dequantized for the call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import LoadContext
from . import RowScaledLinear, calibration_ids, capture_inputs, check_skip, linears, norm_fed_linears


# torch._int_mm's limits (cuBLASLt's int8 GEMM): more than 16 rows, K and N multiples of 8
INT_MM_MIN_TOKENS = 17
# From this many tokens, weight-only int8 and int4 products on Hopper go to fastllm.kernels.cutlass_gemm
# (below it, Triton's split-K GEMM was faster on three of an H100's four Llama-3-8B layers)
CUTLASS_MIN_TOKENS = 128
# Weight-only products of PLANES_MIN_TOKENS..PLANES_MAX_TOKENS tokens on CUDA (bf16 / fp16; where
# the CUTLASS GEMM does not take them) go to fastllm.kernels.w8a8.w8a16_planes: the activations as
# two int8 planes, the weight straight to the int8 tensor cores. On an H200 (Llama-2-7B layers,
# scripts/planes_gpu.py, 2026-11-28) the Triton GEMM was as fast or faster at 2-16 and 1,024 tokens,
# this faster at 32-256 and even at 512.
PLANES_MIN_TOKENS = 17
PLANES_MAX_TOKENS = 511


def quantize_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) symmetric int8 quantization of activations x [M, K]:
    (q int8 [M, K], scale fp32 [M, 1]) with x ~ q * scale; one Triton kernel on CUDA."""
    if x.is_cuda:
        from ...kernels.fused import quant_int8_rows

        return quant_int8_rows(x)
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_int8_planes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] per token as two int8 planes (q int8 [2, M, K], scale fp32 [M]) with x ~ scale *
    (q[0] + q[1] / 254): what w8a16_planes multiplies. One Triton kernel on CUDA; the same
    arithmetic in torch elsewhere (ties away from zero, in fp32)."""
    if x.is_cuda:
        from ...kernels.fused import quant_int8_planes

        return quant_int8_planes(x)
    scale = x.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
    y = x.float() / scale[:, None]
    q = torch.trunc(y + torch.where(y >= 0, 0.5, -0.5)).clamp(-127, 127)
    r = (y - q) * 254.0
    q2 = torch.trunc(r + torch.where(r >= 0, 0.5, -0.5)).clamp(-127, 127)
    return torch.stack([q, q2]).to(torch.int8), scale


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale fp32 [N]) with w ~ q * scale[:, None]; |w - q*s| <= s/2."""
    scale = w.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(RowScaledLinear):
    """A linear layer with int8 weights and per-output-channel fp32 scales."""

    quantize = staticmethod(quantize_int8)
    # From this many tokens (CUDA, weight-only) the weight is dequantized in one pass into a
    # transient buffer and cuBLAS multiplies it (as Int4Linear does from 256). The pass costs
    # about 3 bytes per weight. On an H100 (Llama-3-8B layers, scripts/sweep_qgemm.py --ms=256,1024,
    # 2026-11-27), once the Triton GEMM dropped its masks at whole K steps, the four layers took
    # 761 us through it at 1,024 tokens against 857 dequantized (only qkv_proj, 107 against 93 us,
    # was faster dequantized).
    dense_min_tokens = 2048

    def __init__(self, linear: nn.Linear, dynamic_activations: bool = False):
        super().__init__(linear)
        self._scale_cache: dict[torch.dtype, torch.Tensor] = {}
        self.dynamic_activations = dynamic_activations

    def _scale_as(self, dtype: torch.dtype) -> torch.Tensor:
        s = self._scale_cache.get(dtype)
        if s is None:
            s = self._scale_cache[dtype] = self.scale.to(dtype)
        return s

    def _words_aligned(self) -> bool:
        """Whether qgemm.dequantize_rows can read the weight as int32 words."""
        q = self.qweight
        return q.stride(1) == 1 and q.shape[1] % 4 == 0 and q.stride(0) % 4 == 0 and q.data_ptr() % 4 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self._one_token(flat):
            out = self._gemv(flat)
        elif self.dynamic_activations and (flat.is_cuda and flat.shape[0] >= INT_MM_MIN_TOKENS
                                           or self._int_mm_fits(flat)):  # W8A8 on the int8 tensor cores / AMX
            xq, x_scale = quantize_int8_rows(flat)
            if flat.is_cuda:  # scales, bias and rounding in the GEMM's epilogue
                from ...kernels.w8a8 import w8a8_matmul

                out = w8a8_matmul(xq, x_scale, self.qweight, self.scale, self.bias, flat.dtype)
            else:
                acc = torch._int_mm(xq, self.qweight.t())  # int32 [M, N], exact
                out = (acc.float() * x_scale * self.scale).to(flat.dtype)
                if self.bias is not None:
                    out = out + self.bias
        elif flat.shape[0] >= CUTLASS_MIN_TOKENS and self.bias is None and flat.is_cuda and self._cutlass(flat):
            from ...kernels.cutlass_gemm import w8a16

            out = w8a16(flat, self.qweight, self.scale)
        elif (PLANES_MIN_TOKENS <= flat.shape[0] <= PLANES_MAX_TOKENS and flat.is_cuda
              and flat.dtype in (torch.bfloat16, torch.float16) and self.qweight.stride(1) == 1):
            from ...kernels.w8a8 import w8a16_planes

            out = w8a16_planes(flat, self.qweight, self.scale, self.bias)
        elif flat.device.type in self.devices and flat.shape[0] >= self.dense_min_tokens and self._words_aligned():
            from ...kernels import qgemm

            out = F.linear(flat, qgemm.dequantize_rows(self.qweight, self.scale, flat.dtype), self.bias)
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

    def _cutlass(self, flat: torch.Tensor) -> bool:
        """Whether fastllm.kernels.cutlass_gemm takes this product (built on first use)."""
        from ...kernels import cutlass_gemm as C

        return C.fits(flat, self.qweight) and self.scale.dtype == torch.float32 and C.available(flat)

    def _int_mm_fits(self, flat: torch.Tensor) -> bool:
        return flat.shape[0] >= INT_MM_MIN_TOKENS and self.in_features % 8 == 0 and self.out_features % 8 == 0

    def extra_repr(self) -> str:
        return super().extra_repr() + (", dynamic int8 activations" if self.dynamic_activations else "")


class Int8Quantizer:
    """`quantizer="int8"`, or `{"name": "int8", "skip": ["lm_head", "*.o_proj"]}`: every
    nn.Linear whose module name matches none of `skip` (fnmatch patterns; default: the LM head,
    kept in full precision) becomes an Int8Linear. Embeddings are never quantized.

    `activations="dynamic"` (W8A8): batches of 17 or more tokens also quantize their activations
    per token to int8 and multiply on the int8 tensor cores (fastllm.kernels.w8a8: twice bf16's
    peak on Hopper) or the CPU's int8 units (torch._int_mm); fewer tokens stay weight-only.
    Faster where a batch is compute-bound, at some quality cost (docs/quantization.md).
    `smooth` (SmoothQuant's alpha, e.g. 0.5, with `calibration_tokens` / `calibration_file`)
    first moves activation outliers into the weights (see smooth_into_norms)."""

    api_version = 1

    def __init__(self, skip: list[str] | tuple[str, ...] = ("lm_head",), activations: str = "none",
                 smooth: float | None = None, calibration_tokens: int = 512, calibration_file: str | None = None):
        from ...errors import ConfigError

        self.skip = check_skip("int8 quantizer", skip)
        if activations not in ("none", "dynamic"):
            raise ConfigError(f"int8 quantizer: activations is 'none' (weight-only) or 'dynamic' (per-token int8 "
                              f"activations for batches of {INT_MM_MIN_TOKENS}+ tokens), got {activations!r}")
        self.dynamic = activations == "dynamic"
        if smooth is not None and (activations != "dynamic" or isinstance(smooth, bool)
                                   or not isinstance(smooth, (int, float)) or not 0 <= smooth <= 1):
            raise ConfigError(f"int8 quantizer: smooth (SmoothQuant's alpha, in [0, 1]) applies with "
                              f"activations='dynamic'; got smooth={smooth!r}, activations={activations!r}")
        self.smooth, self.tokens, self.path = smooth, calibration_tokens, calibration_file

    def apply(self, model: nn.Module, ctx: LoadContext) -> nn.Module:
        if self.smooth is not None:
            smooth_into_norms(model, ctx, self.smooth, self.skip, self.tokens, self.path)
        for parent, name, child in linears(model, self.skip):
            setattr(parent, name, Int8Linear(child, self.dynamic))
        return model


def smooth_into_norms(model: nn.Module, ctx: LoadContext, alpha: float, skip: tuple[str, ...], tokens: int,
                      path: str | None) -> None:
    """SmoothQuant (Xiao et al. 2023) for the linears that follow an RMSNorm (qkv_proj, gate_up_proj):
    per input channel j, s_j = max|x_j|^alpha / max|w_:j|^(1 - alpha) over calibration activations;
    the norm's weight is divided by s and the layer's columns multiplied by it. The product is
    unchanged, but activation outliers move into the weights, where per-row int8 absorbs them.
    No runtime cost. o_proj and down_proj (no norm before them) are left as they are."""
    norms = norm_fed_linears(model)
    pairs = [(norms[id(child)], child) for _, _, child in linears(model, skip) if id(child) in norms]
    if not pairs:
        return
    ids = calibration_ids(ctx, tokens, path)
    inputs = capture_inputs(model, [lin for _, lin in pairs], ids, ctx.device, ctx.dtype)
    with torch.no_grad():
        for (norm, lin), x in zip(pairs, inputs):
            a = x.abs().amax(dim=0).clamp(min=1e-5)
            w = lin.weight.float().abs().amax(dim=0).clamp(min=1e-5)
            s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
            norm.weight.div_(s.to(norm.weight.dtype))
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])

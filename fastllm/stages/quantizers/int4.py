"""`quantizer="int4"`: weight-only int4, group-wise and asymmetric (w ~ (q - zero) * scale, q in
0..15, one scale and zero point per `group_size` columns of a row), two values per byte.

A quarter of bf16's weight bytes (plus 2 x fp32 per group). Scale and zero point are stored
interleaved, `scales_zeros` [N, groups rounded up to even, 2] (padding zero), so the GEMV reads
them in 16-byte loads; `scales` / `zeros` are views of it. On CUDA, fastllm.kernels.gemv_int4
(one token), fastllm.kernels.cuda_w4 (2-16 tokens in groups of 128, where nvcc builds it) and
fastllm.kernels.qgemm (more tokens) read the packed bytes and dequantize in registers; on
Hopper, 128+ tokens go through CUTLASS's mixed-input GEMM where it builds
(fastllm.kernels.cutlass_gemm, which times it against qgemm and dequantize-then-cuBLAS); on the
CPU with bf16 activations torch's int4 kernel runs (a second, CPU-layout copy of the packed
weight is made on first use); elsewhere the weight is dequantized for the call
(correct; no speed-up). K is padded to a multiple of the group size (SmolLM2's 576 columns in
groups of 128, for one).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ..base import LoadContext
from . import calibration_ids, capture_inputs, check_skip, linears, norm_fed_linears
from .int8 import CUTLASS_MIN_TOKENS

GROUP_SIZES = (32, 64, 128)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, Kp/2], scales fp32 [N, Kp/G], zeros fp32 [N, Kp/G]),
    round to nearest per group; padded columns are zero."""
    N, K = w.shape
    Kp = -(-K // group_size) * group_size
    wf = F.pad(w.detach().float(), (0, Kp - K)).view(N, Kp // group_size, group_size)
    lo, hi = wf.amin(dim=2), wf.amax(dim=2)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = (torch.round(wf / scales[..., None]) + zeros[..., None]).clamp(0, 15).to(torch.uint8).view(N, Kp)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scales, zeros


def pack_scales(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(scales, zeros) [N, ng] -> fp32 [N, ng rounded up to even, 2], interleaved, padding zero:
    each row 16-byte aligned, so fastllm.kernels.gemv_int4 reads two groups' pairs per load."""
    N, ng = scales.shape
    out = torch.zeros(N, ng + ng % 2, 2, dtype=torch.float32, device=scales.device)
    out[:, :ng, 0] = scales
    out[:, :ng, 1] = zeros
    return out


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, K: int) -> torch.Tensor:
    """fp32 [N, K] from the packed form."""
    N = packed.shape[0]
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(N, -1).float()  # [N, Kp]
    G = q.shape[1] // scales.shape[1]
    w = (q.view(N, -1, G) - zeros[..., None]) * scales[..., None]
    return w.view(N, -1)[:, :K]


class Int4Linear(nn.Module):
    """A linear layer with group-wise asymmetric int4 weights."""

    devices = ("cuda",)  # where the Triton GEMV runs (tests add "cpu": Triton's interpreter)

    def __init__(self, linear: nn.Linear, group_size: int, input_scale: torch.Tensor | None = None):
        """input_scale [K] (activation-aware): the weight's columns are quantized multiplied by it,
        and inputs are divided by it, so columns that meet large activations keep more precision."""
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        w = linear.weight.detach().float()
        if input_scale is not None:
            w = w * input_scale[None, :]
        packed, scales, zeros = quantize_int4(w, group_size)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", pack_scales(scales, zeros))
        inv = None if input_scale is None else (1.0 / input_scale.float()).to(linear.weight.dtype)
        self.register_buffer("inv_input_scale", inv)  # [K] or None
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def scales(self) -> torch.Tensor:
        """fp32 [N, Kp / G], a view of scales_zeros."""
        return self.scales_zeros[:, :self.packed.shape[1] * 2 // self.group_size, 0]

    @property
    def zeros(self) -> torch.Tensor:
        """fp32 [N, Kp / G] (whole numbers 0..15), a view of scales_zeros."""
        return self.scales_zeros[:, :self.packed.shape[1] * 2 // self.group_size, 1]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # files saved before scales and zeros were interleaved hold them as two tensors
        if prefix + "scales" in state_dict and prefix + "scales_zeros" not in state_dict:
            state_dict[prefix + "scales_zeros"] = pack_scales(state_dict.pop(prefix + "scales"),
                                                              state_dict.pop(prefix + "zeros"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as the layer applies it, input scaling folded back in: [N, K]."""
        w = dequantize_int4(self.packed, self.scales, self.zeros, self.in_features)
        if self.inv_input_scale is not None:
            w = w * self.inv_input_scale.float()[None, :]
        return w.to(dtype)

    # From this many tokens the weight is dequantized to x's dtype in one pass and multiplied by
    # cuBLAS, as vLLM's AWQ layers do from 256 tokens. On an H100 (Llama-2-7B layers, 2026-11-27)
    # that ran at 0.39-0.49x bf16's speed at 256 tokens, 0.66-0.71x at 1,024 and 0.90-0.94x at
    # 4,096, against qgemm_int4's 0.33-0.44x (docs/quantization.md). A transient [N, K] buffer per call.
    dense_min_tokens = 256
    # Up to this many tokens (and from 2), groups of 128 and bf16 inputs go through
    # fastllm.kernels.cuda_w4 (mma.sync) where it builds. Four Llama-2-7B layers on an H200
    # (scripts/w4_mma_gpu.py, 2026-11-28): 16 tokens 80.7 us against the Triton GEMM's 101.5 and
    # bf16's 118.1; 32 tokens 111 against 112.5; 64 tokens 191 against 177 (each layer's best split).
    mma_max_tokens = 16

    def _cutlass(self, flat: torch.Tensor) -> bool:
        """Whether fastllm.kernels.cutlass_gemm takes this product (built on first use); its group
        operands made on first use (bf16 scales and -zero * scale, [groups, N]: 4 bytes a group)."""
        from ...kernels import cutlass_gemm as C

        if not (C.fits_int4(flat, self.packed, self.group_size) and C.available(flat)):
            return False
        ops = getattr(self, "_cutlass_operands", None)
        if ops is None or ops[0].device != flat.device:
            self._cutlass_operands = C.int4_operands(self.scales, self.zeros)
        return True

    def _mma(self, flat: torch.Tensor) -> bool:
        from ...kernels import cuda_w4

        return cuda_w4.fits(flat, self.packed, self.scales_zeros, self.group_size) and cuda_w4.available(flat)

    def _cpu_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's CPU int4 layout, made on first use: (weight, scales_and_zeros [Kp/G, N, 2] bf16);
        tinygemm's zero point is in the float domain: w = (q - 8) * s + (8 - z) * s."""
        if getattr(self, "_cpu", None) is None:
            q = torch.stack([self.packed & 0xF, self.packed >> 4], dim=-1).view(self.out_features, -1)
            sz = torch.stack([self.scales, (8 - self.zeros) * self.scales], dim=-1).transpose(0, 1)
            self._cpu = (torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
                         sz.contiguous().to(torch.bfloat16))
        return self._cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        fused = flat.device.type in self.devices  # the Triton kernels (GEMV, GEMM) or torch's CPU kernel
        if self.inv_input_scale is not None and (fused or flat.device.type == "cpu"):
            flat = flat * self.inv_input_scale
            w_scaled = True
        else:
            w_scaled = False
        if flat.shape[0] == 1 and flat.device.type in self.devices:
            from ...kernels.gemv_int4 import gemv_int4

            out = gemv_int4(flat, self.packed, self.scales, self.zeros, self.group_size, self.bias,
                            pairs=self.scales_zeros)
        elif fused and 2 <= flat.shape[0] <= self.mma_max_tokens and flat.is_cuda and self._mma(flat):
            from ...kernels.cuda_w4 import w4_mma

            out = w4_mma(flat, self.packed, self.scales_zeros, self.group_size, self.bias)
        elif fused and flat.shape[0] >= CUTLASS_MIN_TOKENS and self.bias is None and flat.is_cuda and self._cutlass(flat):
            from ...kernels.cutlass_gemm import w4a16

            out = w4a16(flat, self.packed, self.scales, self.zeros, self.group_size, self._cutlass_operands)
        elif fused and flat.shape[0] >= self.dense_min_tokens:
            from ...kernels import qgemm

            w = qgemm.dequantize_int4(self.packed, self.scales, self.zeros, self.group_size, self.in_features,
                                      flat.dtype)
            out = F.linear(flat, w, self.bias)
        elif fused:
            from ...kernels.qgemm import qgemm_int4

            out = qgemm_int4(flat, self.packed, self.scales, self.zeros, self.group_size, self.bias)
        elif flat.device.type == "cpu" and flat.dtype == torch.bfloat16 and self.out_features % 16 == 0:
            weight, sz = self._cpu_packed()
            Kp = self.packed.shape[1] * 2
            out = torch._weight_int4pack_mm_for_cpu(F.pad(flat, (0, Kp - self.in_features)), weight,
                                                    self.group_size, sz)
            if self.bias is not None:
                out = out + self.bias
        else:
            w = dequantize_int4(self.packed, self.scales, self.zeros, self.in_features)
            if self.inv_input_scale is not None and not w_scaled:
                w = w * self.inv_input_scale.float()[None, :]
            out = F.linear(flat, w.to(flat.dtype), self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    # SiLU-and-mul taken into down_proj's GEMV: off. On an H100 (Llama-2-7B shape, batch 1,
    # scripts/quant_gpu.py, 2026-11-27) the fused kernel, which recomputes the SiLU in every
    # program, made the step slower: with the word kernel 323.9 / 346.2 tok/s against 360.7
    # unfused, in one call; with the TMA kernel (its tile of inputs repeated across its rows' warps)
    # 334.9 / 337.9 against 455.4.
    fuse_silu_mul = False

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        """self(silu(gate) * up) from gate_up [1, 2K] in one kernel (the word GEMV), when
        `fuse_silu_mul` is on; None otherwise (more tokens, the row kernel, or an activation-aware
        input scale, which the kernel does not apply)."""
        from ...kernels import gemv_int4

        if not (self.fuse_silu_mul and gemv_int4.WORDS and self.inv_input_scale is None
                and gate_up.dim() == 2 and gate_up.shape[0] == 1 and gate_up.device.type in self.devices):
            return None
        return gemv_int4.gemv_int4(gate_up, self.packed, self.scales, self.zeros, self.group_size, self.bias,
                                   pairs=self.scales_zeros, silu_mul=True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}"


class Int4Quantizer:
    """`quantizer={"name": "int4", "group_size": 64}` (32, 64 or 128; default 128), `skip`:
    module-name patterns kept in full precision (default: the LM head).

    `activation_aware=True` (AWQ's idea): run the model once over `calibration_tokens` tokens of a
    text (`calibration_file`, default Python's pydoc topics), and for each layer pick the input
    scaling s = mean|x|^a (a on a grid of 0..1; a = 0 is plain rounding) that minimises the
    error of its output on those activations. The division by s is folded into the RMSNorm before
    the layer (qkv_proj, gate_up_proj) or into the rows that produce its input (down_proj, and
    o_proj with one value head per query head: see awq.fold_into_producers); elsewhere the layer
    divides its input at run time."""

    api_version = 1
    conformance_max_rel_error = 0.3  # fastllm.testing: 4 bits move the tiny random model's logits ~20%

    def __init__(self, group_size: int = 128, skip: list[str] | tuple[str, ...] = ("lm_head",),
                 activation_aware: bool = False, calibration_tokens: int = 512, calibration_file: str | None = None):
        if group_size not in GROUP_SIZES:
            raise ConfigError(f"int4 quantizer: group_size must be one of {GROUP_SIZES}, got {group_size!r}")
        skip = check_skip("int4 quantizer", skip)
        if not isinstance(calibration_tokens, int) or calibration_tokens < 16:
            raise ConfigError(f"int4 quantizer: calibration_tokens must be an int >= 16, got {calibration_tokens!r}")
        self.group_size, self.skip = group_size, tuple(skip)
        self.activation_aware, self.calibration_tokens = bool(activation_aware), calibration_tokens
        self.calibration_file = calibration_file

    def apply(self, model: nn.Module, ctx: LoadContext) -> nn.Module:
        from . import awq  # (it quantizes through this module)

        targets = linears(model, self.skip)
        scales: list = [None] * len(targets)
        if self.activation_aware:
            ids = calibration_ids(ctx, self.calibration_tokens, self.calibration_file)
            inputs = capture_inputs(model, [c for _, _, c in targets], ids, ctx.device, ctx.dtype)
            scales = [awq.search_input_scale(c.weight, x, self.group_size) if x is not None else None
                      for (_, _, c), x in zip(targets, inputs)]
        # Each layer's input division goes where it costs nothing at run time: into the RMSNorm
        # before it, or into the rows of the layer that produces its input (before that layer is
        # quantized); only the rest divide in an elementwise pass.
        folded = awq.fold_into_producers(model, {id(c): s for (_, _, c), s in zip(targets, scales) if s is not None})
        norms = norm_fed_linears(model)
        for (parent, name, child), s in zip(targets, scales):
            layer = Int4Linear(child, self.group_size, s)
            norm = norms.get(id(child))
            if layer.inv_input_scale is not None and (norm is not None or id(child) in folded):
                if norm is not None:
                    with torch.no_grad():
                        norm.weight.mul_(layer.inv_input_scale.to(norm.weight.dtype))
                layer.inv_input_scale = None
            setattr(parent, name, layer)
        return model

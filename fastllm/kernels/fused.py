"""Fused small ops for CUDA (Triton): RMSNorm with the residual add, rotary, SiLU-and-mul.

At batch 1 a decode step is weight-bandwidth bound, and every extra kernel launch costs a few
microseconds even inside a CUDA graph; these fold 6-12 elementwise torch kernels into one each.
Math is fp32 in registers, rounded once to the tensor's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pdl, pdl_wait


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, N, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    # The weight does not depend on the kernel before: read before the wait (after it, its read
    # would follow the residual's store, which it may not pass, and cost one more memory latency).
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    pdl_wait(USE_PDL, True)  # x comes from the kernel before (see fastllm.kernels.launch)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(res_ptr.dtype.element_ty)  # the residual stream keeps the model dtype
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
        x = x.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    # round the normalised value to the model dtype before the weight, as the torch model does
    y = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """weight * normalize(x [+ residual]); with a residual, it is updated in place to x + residual."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(x2)
    N = x2.shape[-1]
    res = residual.reshape(-1, N) if residual is not None else x2
    _rms_norm_kernel[(x2.shape[0],)](x2, res, weight, out, x2.stride(0), res.stride(0), out.stride(0), N, eps,
                                     HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(N), num_warps=4,
                                     **pdl(x2, first=True))
    return out.view(x.shape)


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, inv_ptr, stride_t, stride_h, scale, HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.arange(0, BLOCK)
    mask = j < HALF
    pos = tl.load(pos_ptr + t).to(tl.float32)
    freq = pos * tl.load(inv_ptr + j, mask=mask, other=0.0)
    c = tl.cos(freq) * scale
    s = tl.sin(freq) * scale
    base = x_ptr + t * stride_t + h * stride_h
    x1 = tl.load(base + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + j, mask=mask, other=0.0).to(tl.float32)
    tl.store(base + j, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF + j, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)


def rotary_(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """In-place rotate-half RoPE of x [T, heads, D] (last dim contiguous) at positions [T]."""
    T, H, D = x.shape
    assert x.stride(2) == 1
    _rotary_kernel[(T, H)](x, positions, inv_freq, x.stride(0), x.stride(1), scale,
                           HALF=D // 2, BLOCK=triton.next_power_of_2(D // 2), num_warps=1)
    return x


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    row = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :N]) * x[..., N:] for x [..., 2N]."""
    x2 = x.reshape(-1, x.shape[-1])
    N = x2.shape[-1] // 2
    out = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    BLOCK = 1024
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(N, BLOCK))](x2, out, x2.stride(0), out.stride(0), N, BLOCK=BLOCK,
                                                                  **pdl(x2))
    return out.view(*x.shape[:-1], N)


@triton.jit
def _quant_fp8_rows_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, N, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / FP8_MAX
    q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row.to(tl.int64) * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def quant_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) e4m3 quantization of x [M, K] in one pass: (q float8_e4m3fn
    [M, K], scale fp32 [M, 1]) with x ~ q * scale and max |q| = 448 in every nonzero row."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(K)
    _quant_fp8_rows_kernel[(M,)](x, q, scale, x.stride(0), q.stride(0), K, FP8_MAX=448.0, BLOCK=block,
                                 num_warps=max(1, min(16, block // 512)))
    return q, scale


# quant_int8_planes: the second plane holds the first's rounding residual (within +-1/2) in steps of
# 1/RESIDUAL_STEPS, so it spans [-127, 127]
RESIDUAL_STEPS = 254.0
_STEPS = tl.constexpr(RESIDUAL_STEPS)


@triton.jit
def _quant_int8_rows_kernel(x_ptr, q_ptr, s_ptr, stride_x, stride_q, stride_p, N, BLOCK: tl.constexpr,
                            PLANES: tl.constexpr = 1):
    # PLANES = 2: the rounding residual too, in 1/RESIDUAL_STEPS, stride_p bytes on (quant_int8_planes)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 127.0
    y = x / scale
    q = tl.clamp(tl.where(y >= 0, y + 0.5, y - 0.5), -127.0, 127.0)  # round half away from zero, then truncate
    out = q_ptr + row.to(tl.int64) * stride_q + cols
    tl.store(out, q.to(tl.int8), mask=mask)
    if PLANES == 2:
        r = (y - q.to(tl.int8).to(tl.float32)) * _STEPS
        q2 = tl.clamp(tl.where(r >= 0, r + 0.5, r - 0.5), -127.0, 127.0)
        tl.store(out + stride_p, q2.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, scale)


def _quant_int8(x: torch.Tensor, planes: int) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    q = torch.empty(planes, M, K, dtype=torch.int8, device=x.device)
    scale = torch.empty(M, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(K)
    _quant_int8_rows_kernel[(M,)](x, q, scale, x.stride(0), q.stride(1), q.stride(0), K, BLOCK=block, PLANES=planes,
                                  num_warps=max(1, min(16, block // 512)))
    return q, scale


def quant_int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) symmetric int8 quantization of x [M, K] in one pass: (q int8
    [M, K], scale fp32 [M, 1]) with x ~ q * scale and max |q| = 127 in every nonzero row. Ties
    round away from zero (torch.round rounds them to even)."""
    q, scale = _quant_int8(x, 1)
    return q[0], scale[:, None]


def quant_int8_planes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of x [M, K] as two int8 planes with one fp32 scale: (q int8 [2, M, K], scale fp32
    [M]) with x ~ scale * (q[0] + q[1] / RESIDUAL_STEPS). q[0] is quant_int8_rows' q; q[1] is its
    residual, rounded, so |x - that| <= scale / 508 = max|x| / 64,516."""
    return _quant_int8(x, 2)

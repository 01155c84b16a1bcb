"""One-pass dequantization of weight-only quantized weights into a dense tensor (Triton), for
many-token batches where a cuBLAS GEMM on the dense weight outruns fastllm.kernels.qgemm by more
than the pass costs (Int8Linear / Int4Linear.dense_min_tokens). Reached through qgemm, as before."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autotune


# Tiles of the one-pass dequantization kernels: (BLOCK_N rows, BLOCK_W int32 words per row, warps),
# autotuned per weight shape (they run at 256+ tokens, outside CUDA graphs).
DEQUANT_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=nw)
                   for n, w, nw in [(16, 64, 4), (8, 128, 4), (32, 32, 4), (16, 128, 8), (32, 64, 8), (4, 256, 4),
                                    (64, 32, 8), (8, 256, 8)]]


@triton.jit
def _dequant_int4_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, KW, stride_w, stride_sn, stride_sg, stride_o,
                         G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    # Grid (N / BLOCK_N, words per row / BLOCK_W): out[n, 8 c + j] = (nibble j of word c - zero) * scale
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    m = (rows < N)[:, None] & (c < KW)[None, :]
    words = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_w + c[None, :], mask=m, other=0)
    sz = rows.to(tl.int64)[:, None] * stride_sn + (c * 8 // G)[None, :] * stride_sg
    s = tl.load(s_ptr + sz, mask=m, other=0.0)
    z = tl.load(z_ptr + sz, mask=m, other=0.0)
    q = (words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 0xF  # [BLOCK_N, BLOCK_W, 8]
    v = (q.to(tl.float32) - z[:, :, None]) * s[:, :, None]
    k = 8 * c[:, None] + tl.arange(0, 8)[None, :]  # [BLOCK_W, 8]
    tl.store(out_ptr + rows.to(tl.int64)[:, None, None] * stride_o + k[None], v.to(out_ptr.dtype.element_ty),
             mask=(rows < N)[:, None, None] & (k < K)[None])


_dequant_int4 = autotune(DEQUANT_CONFIGS, key=["N", "KW", "G"])(_dequant_int4_kernel)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, K: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The int4 weight as a dense [N, K] tensor of `dtype`, in one pass (each value (q - zero) * scale
    in fp32, rounded once, as qgemm_int4 rounds its tiles): for many tokens, where a cuBLAS GEMM
    on it outruns qgemm_int4 by more than the pass costs (see Int4Linear.dense_min_tokens)."""
    N, Kp = packed.shape[0], packed.shape[1] * 2
    assert packed.stride(1) == 1 and packed.stride(0) % 4 == 0 and packed.data_ptr() % 4 == 0 and K <= Kp
    assert scales.shape == zeros.shape == (N, Kp // group_size) and scales.stride() == zeros.stride()
    w = packed.view(torch.int32)  # [N, Kp / 8]
    out = torch.empty(N, K, dtype=dtype, device=packed.device)
    args = (w, scales, zeros, out, N, K, w.shape[1], w.stride(0), *scales.stride(), out.stride(0))
    _launch_dequant(_dequant_int4, _dequant_int4_kernel, N, w.shape[1], args, G=group_size)
    return out


def _launch_dequant(tuned, kernel, N: int, KW: int, args: tuple, **consts) -> None:
    """A one-pass dequantization over (N / BLOCK_N, KW / BLOCK_W) programs, autotuned; in Triton's
    interpreter one fixed tile (the autotuner would time every tile there)."""
    if type(kernel).__name__ == "InterpretedFunction":
        kernel[(triton.cdiv(N, 16), triton.cdiv(KW, 64))](*args, **consts, BLOCK_N=16, BLOCK_W=64)
    else:
        tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]), triton.cdiv(KW, m["BLOCK_W"]))](*args, **consts)


@triton.jit
def _dequant_rows_kernel(w_ptr, s_ptr, out_ptr, N, K, KW, stride_w, stride_o,
                         BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    # Grid (N / BLOCK_N, words per row / BLOCK_W): out[n, 4 c + j] = byte j of word c (int8) * scale[n]
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    words = tl.load(w_ptr + rows.to(tl.int64)[:, None] * stride_w + c[None, :],
                    mask=(rows < N)[:, None] & (c < KW)[None, :], other=0)
    q = (words[:, :, None] << (24 - 8 * tl.arange(0, 4))[None, None, :]) >> 24  # sign-extended bytes
    s = tl.load(s_ptr + rows, mask=rows < N, other=0.0)
    v = q.to(tl.float32) * s[:, None, None]
    k = 4 * c[:, None] + tl.arange(0, 4)[None, :]  # [BLOCK_W, 4]
    tl.store(out_ptr + rows.to(tl.int64)[:, None, None] * stride_o + k[None], v.to(out_ptr.dtype.element_ty),
             mask=(rows < N)[:, None, None] & (k < K)[None])


_dequant_rows = autotune(DEQUANT_CONFIGS, key=["N", "KW"])(_dequant_rows_kernel)


def dequantize_rows(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An int8 row-scaled weight (q [N, K], fp32 scale [N]) as a dense [N, K] tensor of `dtype` in one
    pass, each value q * scale in fp32 rounded once: for many tokens, where cuBLAS on it outruns
    qgemm_rows by more than the pass costs (see Int8Linear.dense_min_tokens)."""
    N, K = qweight.shape
    assert qweight.dtype == torch.int8 and qweight.stride(1) == 1 and scale.shape == (N,)
    assert K % 4 == 0 and qweight.stride(0) % 4 == 0 and qweight.data_ptr() % 4 == 0
    w = qweight.view(torch.int32)  # [N, K / 4]
    out = torch.empty(N, K, dtype=dtype, device=qweight.device)
    args = (w, scale, out, N, K, w.shape[1], w.stride(0), out.stride(0))
    _launch_dequant(_dequant_rows, _dequant_rows_kernel, N, w.shape[1], args)
    return out

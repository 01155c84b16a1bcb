"""int8 weights times 16-bit activations on the int8 tensor cores (Triton), for many tokens.

Weight-only int8 under bf16 activations has no tensor-core instruction of its own: the usual
route dequantizes the weight to bf16 (in registers, or in a pass before cuBLAS) and runs at bf16's
rate. Here each activation row goes to 16-bit fixed point instead, x ~ sx * xq with
xq = round(x / sx) in [-32639, 32639] and sx = max|x| / 32639, and xq is split into two int8
planes, xq = 256 * hi + lo (hi = floor(xq / 256 + 1/2), lo in [-128, 127]). Then

    y = sx * sw * (256 * (hi @ Wq^T) + lo @ Wq^T)

with both products exact in int32 (K * 128 * 127 < 2^31 up to K = 132,000). The two int8 products
cost one bf16 product's tensor-core time (Hopper runs int8 at twice bf16's rate), the weight is
read as stored and never written back as bf16. The only rounding the activations get is the
fixed point's: at most max|x| / 65278 per element, against bf16's own |x| / 256; it is coarser
than bf16 only for elements under 1/255 of their row's largest.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

XQ_MAX = 32639  # 127 * 256 + 127: hi = round(xq / 256) stays in [-127, 127] and lo in [-128, 127]

CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
           for m, n, k, w, s in [(128, 128, 128, 8, 4), (128, 256, 128, 8, 3), (64, 256, 128, 8, 4),
                                 (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (256, 128, 128, 8, 3),
                                 (128, 64, 128, 4, 4)]]


@triton.jit
def _split_rows_kernel(x_ptr, hi_ptr, lo_ptr, s_ptr, stride_x, stride_q, K, BLOCK: tl.constexpr,
                       XMAX: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-30) / XMAX
    xq = x / s
    xq = tl.where(xq >= 0, tl.floor(xq + 0.5), -tl.floor(0.5 - xq))  # round half away from zero
    xq = tl.minimum(tl.maximum(xq, -XMAX), XMAX)
    hi = tl.floor(xq / 256.0 + 0.5)  # ties up, so lo = xq - 256 hi stays in [-128, 127]
    lo = xq - 256.0 * hi
    tl.store(hi_ptr + row.to(tl.int64) * stride_q + cols, hi.to(tl.int8), mask=mask)
    tl.store(lo_ptr + row.to(tl.int64) * stride_q + cols, lo.to(tl.int8), mask=mask)
    tl.store(s_ptr + row, s)


def split_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] -> (hi, lo int8 [M, K], sx fp32 [M]) with x ~ sx * (256 hi + lo) per row."""
    M, K = x.shape
    hi = torch.empty(M, K, dtype=torch.int8, device=x.device)
    lo = torch.empty_like(hi)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(K)
    _split_rows_kernel[(M,)](x, hi, lo, s, x.stride(0), hi.stride(0), K, BLOCK=block, XMAX=XQ_MAX,
                             num_warps=max(1, min(16, block // 512)))
    return hi, lo, s


@triton.autotune(CONFIGS, key=["M_BUCKET", "N", "K"])
@triton.jit
def _i16gemm_kernel(hi_ptr, lo_ptr, w_ptr, sx_ptr, sw_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET, stride_q, stride_w,
                    stride_y, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * tiles_n  # programs of a band of GROUP_M row tiles share weight tiles in L2
    first_m = (pid // band) * GROUP_M
    rows_in_band = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows_in_band
    pid_n = (pid % band) // rows_in_band
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_off = offs_m.to(tl.int64)[:, None] * stride_q + offs_k[None, :]  # [BM, BK]
    w_off = offs_n.to(tl.int64)[None, :] * stride_w + offs_k[:, None]  # [BK, BN]: W^T, K-major
    acc_hi = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + offs_k) < K
        w = tl.load(w_ptr + w_off + k, mask=k_ok[:, None] & n_ok[None, :], other=0)
        a_hi = tl.load(hi_ptr + a_off + k, mask=m_ok[:, None] & k_ok[None, :], other=0)
        a_lo = tl.load(lo_ptr + a_off + k, mask=m_ok[:, None] & k_ok[None, :], other=0)
        acc_hi = tl.dot(a_hi, w, acc_hi, out_dtype=tl.int32)
        acc_lo = tl.dot(a_lo, w, acc_lo, out_dtype=tl.int32)
    sx = tl.load(sx_ptr + offs_m, mask=m_ok, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)
    y = (acc_hi.to(tl.float32) * 256.0 + acc_lo.to(tl.float32)) * sx[:, None] * sw[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_y + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def i16gemm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (16-bit or fp32) @ (qweight int8 [N, K] * scale fp32 [N, 1 or none])^T (+ bias) -> [M, N] in x's dtype,
    through 16-bit fixed-point activations (see the module docstring)."""
    M, K = x.shape
    N = qweight.shape[0]
    hi, lo, sx = split_rows(x)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _i16gemm_kernel[grid](hi, lo, qweight, sx, scale.reshape(-1), bias if bias is not None else sx, y, M, N, K,
                          triton.next_power_of_2(M), hi.stride(0), qweight.stride(0), y.stride(0),
                          HAS_BIAS=bias is not None)
    return y

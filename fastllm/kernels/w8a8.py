"""int8 x int8 matrix product with the dequantization in the epilogue (Triton), for int8's W8A8
mode (`{"name": "int8", "activations": "dynamic"}`):

    y[m, n] = (sum_k xq[m, k] wq[n, k]) * x_scale[m] * w_scale[n] (+ bias[n])

xq: activations quantized per token (fastllm.kernels.fused.quant_int8_rows), wq: the layer's int8
weight [N, K], both K-contiguous, which is the operand order the int8 tensor cores take. The
products are summed exactly in int32 on the tensor cores (Hopper runs int8 at twice bf16's rate);
the scales, the bias and the rounding to the output dtype happen once per output, in registers.
torch._int_mm does the same product but leaves the int32 result [M, N] in memory for separate
scale and cast passes, which cost more than the product saves at these sizes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import autotune

CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for m, n, k, w, s in [(16, 64, 256, 4, 4), (32, 64, 256, 4, 4), (64, 64, 256, 4, 4), (64, 128, 128, 4, 4),
                                 (128, 64, 128, 4, 4), (128, 128, 128, 8, 4), (128, 256, 128, 8, 3),
                                 (256, 128, 128, 8, 3), (128, 128, 64, 4, 4), (64, 256, 128, 8, 4)]]


def _prune(configs, named_args, **kwargs):
    """Tiles no taller than the token count rounded up (at least 16)."""
    m = named_args["M_BUCKET"]
    return [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)] or configs[:1]


@triton.jit
def _w8a8_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_ym,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    # Grid: output tiles, N tiles walked in bands of GROUP_N so programs running together share x rows.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    GROUP_N: tl.constexpr = 8
    band = pid // (GROUP_N * num_m)
    first_n = band * GROUP_N
    width = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % (GROUP_N * num_m)) % width
    pid_m = (pid % (GROUP_N * num_m)) // width
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past M / N read row 0 of their tile's neighbours (clamped), so loads need no row mask;
    # their results are never stored.
    rows_x = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    rows_w = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    m_ok = offs_m < M
    n_ok = offs_n < N
    xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


_tuned = autotune(CONFIGS, key=["M_BUCKET", "N", "K", "EVEN_K"], prune_configs_by={"early_config_prune": _prune})(
    _w8a8_kernel)


def w8a8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, config: triton.Config | None = None) -> torch.Tensor:
    """xq int8 [M, K] with x_scale fp32 [M] (or [M, 1]) times wq int8 [N, K] with w_scale fp32 [N]:
    y [M, N] in out_dtype, each output (exact int32 sum) * x_scale * w_scale (+ bias), rounded once."""
    M, K = xq.shape
    N = wq.shape[0]
    assert xq.dtype == wq.dtype == torch.int8 and wq.shape[1] == K and xq.stride(1) == 1 and wq.stride(1) == 1
    assert x_scale.numel() == M and w_scale.shape == (N,)
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    args = (xq, x_scale.reshape(M), wq, w_scale, bias if bias is not None else w_scale, y, M, N, K,
            triton.next_power_of_2(M), xq.stride(0), wq.stride(0), y.stride(0))
    flags = dict(HAS_BIAS=bias is not None)
    if config is None:
        flags["EVEN_K"] = K % 256 == 0  # every tile's BLOCK_K divides 256
        _tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    else:
        kw = config.kwargs
        _w8a8_kernel[(triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"]),)](
            *args, **flags, EVEN_K=K % kw["BLOCK_K"] == 0, **kw, num_warps=config.num_warps,
            num_stages=config.num_stages)
    return y

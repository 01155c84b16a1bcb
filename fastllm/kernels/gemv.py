"""Matrix-vector product for batch-1 decode (Triton): y[N] = W[N, K] @ x[K] (+ bias).

At one token a linear layer is a pure weight stream: each program reads BLOCK_N full rows of W
in BLOCK_K-wide, 16-byte-vectorised tiles, multiplies by x in fp32 registers and reduces once
at the end. N / BLOCK_N programs, no split-K (which would need an fp32 buffer and a second
kernel): small BLOCK_N gives the grid enough programs to fill the card.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n, k, w, s in [(4, 512, 4, 4), (8, 256, 4, 4), (8, 512, 4, 3), (8, 512, 8, 4), (16, 256, 4, 4),
                              (16, 512, 8, 3), (4, 1024, 4, 3), (8, 1024, 8, 3), (2, 1024, 4, 4), (32, 256, 8, 3)]]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                    eviction_policy="evict_first")  # streamed once: keep L2 for x and the rest
        x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


_tuned = triton.autotune(configs=CONFIGS, key=["N", "K"])(_gemv_kernel)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: triton.Config | None = None) -> torch.Tensor:
    """x [1, K] or [K], weight [N, K] (row-major), bias [N] -> [1, N] or [N] in x's dtype.
    `config` pins a kernel configuration (benchmarks); by default it is autotuned per shape."""
    N, K = weight.shape
    assert x.shape[-1] == K and x.numel() == K and weight.stride(1) == 1, (x.shape, weight.shape)
    xv = x.reshape(K).contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else y
    if config is None:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _tuned[grid](xv, weight, b, y, N, K, weight.stride(0), HAS_BIAS=bias is not None)
    else:
        kw = dict(config.kwargs)
        _gemv_kernel[(triton.cdiv(N, kw["BLOCK_N"]),)](
            xv, weight, b, y, N, K, weight.stride(0), HAS_BIAS=bias is not None, **kw,
            num_warps=config.num_warps, num_stages=config.num_stages)
    return y.view(*x.shape[:-1], N)

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

import functools

import torch
import triton
import triton.language as tl

from triton.tools.tensor_descriptor import TensorDescriptor

from .launch import autotune, tma_supported
from .fused import _STEPS
from . import qgemm
from .qgemm import _split_k, _split_sum, _tile

CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for m, n, k, w, s in [(16, 64, 256, 4, 4), (32, 64, 256, 4, 4), (64, 64, 256, 4, 4), (64, 128, 128, 4, 4),
                                 (128, 64, 128, 4, 4), (128, 128, 128, 8, 4), (128, 256, 128, 8, 3),
                                 (256, 128, 128, 8, 3), (128, 128, 64, 4, 4), (64, 256, 128, 8, 4)]]


def _prune(configs, named_args, **kwargs):
    """Tiles no taller than the token count rounded up (at least 16); with two planes, each whole and
    also with its split-K where that is more than 1 (qgemm._split_k: about two programs per SM). On
    an H200 at 64 tokens the split helped o_proj and down_proj and cost qkv_proj and gate_up_proj."""
    m = named_args["M_BUCKET"]
    fits = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)] or configs[:1]
    if kwargs.get("PLANES", 1) == 1:
        return fits
    out = []
    for c in fits:
        split = _split_k(m, named_args["N"], named_args["K"], c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                         c.kwargs["BLOCK_K"])
        out += [triton.Config(dict(c.kwargs, SPLIT_K=k), num_warps=c.num_warps, num_stages=c.num_stages)
                for k in sorted({1, split})]
    return out


@functools.lru_cache(maxsize=None)
def _max_split(m_bucket: int, N: int, K: int, max_tokens: int) -> int:
    """The largest split-K among the two-plane tiles the autotuner may pick (the workspace's slices);
    cached (max_tokens: qgemm.SPLIT_K_MAX_TOKENS, which _split_k reads, part of the key)."""
    return max(c.kwargs["SPLIT_K"] for c in _prune(CONFIGS, dict(M_BUCKET=m_bucket, N=N, K=K), PLANES=2))


@triton.jit
def _epilogue(acc, xs_ptr, ws_ptr, b_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    """y = acc (fp32) * x_scale[m] * w_scale[n] (+ bias[n]), rounded once to y's dtype."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    xs = tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)
    ws = tl.load(ws_ptr + offs_n, mask=n_ok, other=0.0)
    out = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _w8a8_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET, stride_xm, stride_wn, stride_ym,
                 stride_xp, part_ptr, cnt_ptr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PLANES: tl.constexpr = 1, SPLIT_K: tl.constexpr = 1):
    # Grid (output tiles (see _tile), SPLIT_K); operands through pointer loads. PLANES = 2: x's second
    # plane (stride_xp bytes on) holds the residual in 1/254ths, multiplied by the same weight tile.
    # SPLIT_K > 1: program (pid, s) sums the s-th share of K's steps (qgemm._split_sum).
    per_split = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K
    k_first = tl.program_id(1) * per_split
    k_last = tl.minimum(k_first + per_split, K)
    m0, n0 = _tile(M, N, BLOCK_M, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = k_first + tl.arange(0, BLOCK_K)
    # Rows past M / N read row 0 instead (clamped), so loads need no row mask; their results are
    # never stored.
    rows_x = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    rows_w = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_first, k_last, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
            if PLANES == 2:
                x2 = tl.load(x_ptrs + stride_xp)
        else:
            k_ok = (k0 - k_first + offs_k) < K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
            if PLANES == 2:
                x2 = tl.load(x_ptrs + stride_xp, mask=k_ok[None, :], other=0)
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        if PLANES == 2:
            acc2 = tl.dot(x2, tl.trans(w), acc2, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out = acc.to(tl.float32)
    if PLANES == 2:
        out += acc2.to(tl.float32) * (1.0 / _STEPS)
    last = True
    if SPLIT_K > 1:
        out, last = _split_sum(out, part_ptr, cnt_ptr, offs_m, offs_n, M, N, (offs_m < M)[:, None] & (offs_n < N)[None, :],
                               SPLIT_K)
    if last:
        _epilogue(out, xs_ptr, ws_ptr, b_ptr, y_ptr, offs_m, offs_n, M, N, stride_ym, HAS_BIAS)


@triton.jit
def _w8a8_tma_kernel(x_desc, xs_ptr, w_desc, ws_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET, stride_ym,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Grid: output tiles (see _tile); operand tiles through TMA (Hopper's tensor memory
    # accelerator: no address arithmetic, out-of-range rows and columns read as zeros).
    m0, n0 = _tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([m0, k0])
        w = w_desc.load([n0, k0])
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
    _epilogue(acc.to(tl.float32), xs_ptr, ws_ptr, b_ptr, y_ptr, m0 + tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N), M, N,
              stride_ym, HAS_BIAS)


def _tma_blocks(nargs: dict) -> None:
    """Autotuner pre-hook of the TMA kernel: the descriptors' blocks follow the configuration."""
    nargs["x_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


TMA_CONFIGS = [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_tma_blocks)
               for c in CONFIGS]
# On Hopper and later, batches of TMA_MIN_TOKENS or more go through TMA (where rows are 16-byte
# aligned). On an H100 (Llama-3-8B layers, scripts/sweep_qgemm.py --w8a8, 2026-11-27) TMA took
# 6-9% less time at 1,024 and 4,096 tokens, about the same at 256, and o_proj at 64 tokens 20% more.
TMA = True
TMA_MIN_TOKENS = 512

_tuned = autotune(CONFIGS, key=["M_BUCKET", "N", "K", "EVEN_K", "PLANES"], prune_configs_by={"early_config_prune": _prune})(
    _w8a8_kernel)
_tuned_tma = autotune(TMA_CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": _prune})(
    _w8a8_tma_kernel)


def _tma_fits(xq: torch.Tensor, wq: torch.Tensor) -> bool:
    """TMA's constraint on the operands: 16-byte aligned rows."""
    return all(t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (xq, wq))


def w8a8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, config: triton.Config | None = None,
                tma: bool | None = None) -> torch.Tensor:
    """xq int8 [M, K] with x_scale fp32 [M] (or [M, 1]) times wq int8 [N, K] with w_scale fp32 [N]:
    y [M, N] in out_dtype, each output (exact int32 sum) * x_scale * w_scale (+ bias), rounded once.
    tma: through the TMA kernel where the strides allow (default: TMA, from TMA_MIN_TOKENS tokens on
    cards with TMA; True also runs it in Triton's interpreter)."""
    M, K = xq.shape
    N = wq.shape[0]
    assert xq.dtype == wq.dtype == torch.int8 and wq.shape[1] == K and xq.stride(1) == 1 and wq.stride(1) == 1
    assert x_scale.numel() == M and w_scale.shape == (N,)
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    rest = (x_scale.reshape(M), bias if bias is not None else w_scale, y, M, N, K, triton.next_power_of_2(M))
    flags = dict(HAS_BIAS=bias is not None)
    grid = (lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),))
    if (TMA and M >= TMA_MIN_TOKENS and tma_supported(xq) if tma is None else tma) and _tma_fits(xq, wq):
        x_desc = TensorDescriptor.from_tensor(xq, [16, 16])  # blocks: set per configuration
        w_desc = TensorDescriptor.from_tensor(wq, [16, 16])
        args = (x_desc, rest[0], w_desc, w_scale, *rest[1:], y.stride(0))
        if config is None:
            _tuned_tma[grid](*args, **flags)
        else:
            _tma_blocks(dict(x_desc=x_desc, w_desc=w_desc, **config.kwargs))
            _w8a8_tma_kernel[grid(config.kwargs)](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                                                  num_stages=config.num_stages)
        return y
    args = (xq, rest[0], wq, w_scale, *rest[1:], xq.stride(0), wq.stride(0), y.stride(0), 0, y, y)
    if config is None:
        flags["EVEN_K"] = K % 256 == 0  # every tile's BLOCK_K divides 256
        _tuned[grid](*args, **flags)
    else:
        _w8a8_kernel[grid(config.kwargs)](*args, **flags, EVEN_K=K % config.kwargs["BLOCK_K"] == 0, **config.kwargs,
                                          num_warps=config.num_warps, num_stages=config.num_stages)
    return y


def w8a16_planes(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 config: triton.Config | None = None) -> torch.Tensor:
    """Weight-only int8 (wq int8 [N, K], w_scale fp32 [N]) times bf16 / fp16 activations x [M, K]
    on the int8 tensor cores: each token is split into two int8 planes, x ~ s * (q1 + q2 / 254)
    (fastllm.kernels.fused.quant_int8_planes; within max|x| / 64,516 of x, finer than bf16 for
    every value over max|x| / 128), and both planes are multiplied by each weight tile as it
    passes, summed exactly in int32. No weight is converted: the tile goes from memory to the
    tensor cores as it is, and the int8 tensor cores run at twice bf16's rate, so two planes cost
    the MMA time of one bf16 product while the weight is half its bytes."""
    from .fused import quant_int8_planes

    M, K = x.shape
    N = wq.shape[0]
    assert wq.dtype == torch.int8 and wq.shape[1] == K and wq.stride(1) == 1 and w_scale.shape == (N,)
    xq, x_scale = quant_int8_planes(x)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    m_bucket = triton.next_power_of_2(M)
    splits = config.kwargs.get("SPLIT_K", 1) if config is not None else _max_split(m_bucket, N, K,
                                                                                    qgemm.SPLIT_K_MAX_TOKENS)
    # split-K: a workspace slice [M, N] per split, and a counter per output tile (16 x 64 the smallest)
    part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else y
    cnt = qgemm._counters(x.device, triton.cdiv(M, 16) * triton.cdiv(N, 64)) if splits > 1 else y
    args = (xq, x_scale, wq, w_scale, bias if bias is not None else w_scale, y, M, N, K, m_bucket,
            xq.stride(1), wq.stride(0), y.stride(0), xq.stride(0), part, cnt)
    flags = dict(HAS_BIAS=bias is not None, PLANES=2)
    if config is None:
        grid = (lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"]))
        _tuned[grid](*args, **flags, EVEN_K=K % 256 == 0)
    else:
        grid = (triton.cdiv(M, config.kwargs["BLOCK_M"]) * triton.cdiv(N, config.kwargs["BLOCK_N"]), splits)
        _w8a8_kernel[grid](*args, **flags, EVEN_K=K % config.kwargs["BLOCK_K"] == 0, **config.kwargs,
                           num_warps=config.num_warps, num_stages=config.num_stages)
    return y

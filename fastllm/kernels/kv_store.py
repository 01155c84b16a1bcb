"""Writing a step's new K/V into a paged KV cache (Triton): store_kv, and rope_store_kv, which
also applies RoPE to q (in place) and k on the way. Layout: see fastllm.kernels.paged_attention."""
from __future__ import annotations

from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # paged_attention's torch reference still works; the kernels raise when launched
    triton = None
    tl = SimpleNamespace(constexpr=None)
_jit = triton.jit if triton is not None else (lambda fn: fn)

from .launch import pdl  # noqa: E402


@_jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_DIM)
    dst = slot * stride_cs + offs_h * stride_ch + offs_d
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs_h * stride_kh + offs_d, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs_h * stride_vh + offs_d, mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


@_jit
def _rope_store_kernel(qk_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, inv_freq_ptr, rope_scale,
                       stride_t, stride_h, stride_vt, stride_vh, stride_cs, stride_ch,
                       NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
                       USE_PDL: tl.constexpr):
    # Grid (T, H + KVH): one head of one token. A q head is rotated in place; a k head is rotated
    # into the cache, with the v head of the same index.
    t = tl.program_id(0)
    h = tl.program_id(1)
    if USE_PDL:  # qk comes from the kernel before (see fastllm.kernels.launch)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    HALF: tl.constexpr = HEAD_DIM // 2
    j = tl.arange(0, BLOCK_HALF)
    mask = j < HALF
    freq = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + j, mask=mask, other=0.0)
    c = tl.cos(freq) * rope_scale
    s = tl.sin(freq) * rope_scale
    src = qk_ptr + t.to(tl.int64) * stride_t + h * stride_h + j
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    if h < NUM_HEADS:
        tl.store(src, y1.to(qk_ptr.dtype.element_ty), mask=mask)
        tl.store(src + HALF, y2.to(qk_ptr.dtype.element_ty), mask=mask)
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:  # -1: CUDA-graph padding
            kvh = h - NUM_HEADS
            dst = slot * stride_cs + kvh * stride_ch + j
            tl.store(k_cache_ptr + dst, y1.to(k_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(k_cache_ptr + dst + HALF, y2.to(k_cache_ptr.dtype.element_ty), mask=mask)
            vsrc = v_ptr + t.to(tl.int64) * stride_vt + kvh * stride_vh + j
            tl.store(v_cache_ptr + dst, tl.load(vsrc, mask=mask), mask=mask)
            tl.store(v_cache_ptr + dst + HALF, tl.load(vsrc + HALF, mask=mask), mask=mask)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    """(block_size, num_kv_heads, head_dim) of a valid cache pair."""
    if triton is None:
        raise ImportError("the paged attention kernels need triton: pip install triton")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim] "
                         f"with equal strides, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.stride(-1) != 1 or k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1):
        raise ValueError("the KV cache must be contiguous within each block")
    block_size = k_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    return block_size, k_cache.shape[2], k_cache.shape[3]


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [T, KVH, D] to the cache rows slot_mapping [T] (int64); slot -1 is skipped."""
    _, kvh, d = _check_cache(k_cache, v_cache)
    if k.shape[1:] != (kvh, d) or v.shape != k.shape or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k and v must be [T, {kvh}, {d}] with unit stride in the last dim, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] == 0:
        return
    _store_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=kvh, HEAD_DIM=d, BLOCK_H=triton.next_power_of_2(kvh), BLOCK_D=triton.next_power_of_2(d))


def rope_store_kv(qk: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float,
                  num_heads: int) -> None:
    """RoPE (rotate-half, cos/sin of positions * inv_freq, times scale) and store_kv in one launch:
    qk [T, num_heads + KVH, D] holds q then k; q is rotated in place, the rotated k and v [T, KVH, D]
    go to the cache rows slot_mapping [T] (-1 skipped). qk itself keeps k unrotated."""
    _, kvh, d = _check_cache(k_cache, v_cache)
    T = qk.shape[0]
    if qk.shape[1:] != (num_heads + kvh, d) or v.shape != (T, kvh, d) or qk.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"qk must be [T, {num_heads + kvh}, {d}] and v [T, {kvh}, {d}] with unit stride in "
                         f"the last dim, got {tuple(qk.shape)} and {tuple(v.shape)}")
    if T == 0:
        return
    if d % 2:
        raise ValueError(f"rotate-half RoPE needs an even head_dim, got {d}")
    _rope_store_kernel[(T, num_heads + kvh)](
        qk, v, k_cache, v_cache, slot_mapping, positions, inv_freq, scale,
        qk.stride(0), qk.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=d, BLOCK_HALF=triton.next_power_of_2(d // 2), num_warps=1, **pdl(qk))

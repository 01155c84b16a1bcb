"""Weight-only int4 (fastllm.stages.quantizers.int4: two values per byte, one scale and integer zero
point per group of G columns) times bf16 / fp16 activations on the int8 tensor cores:

    y[m, n] = x_scale[m] * sum_g scale[n, g] * sum_{k in g} (q1[m, k] + q2[m, k] / 254) * (w[n, k] - zero[n, g])

x is split per token into two int8 planes as for int8 (fastllm.kernels.fused.quant_int8_planes).
Each K step is one group: its nibbles become int8 (w - zero, within +-15) in registers, both planes
are multiplied by them in exact int32 sums, and the step's sums are scaled by the group's scale
into an fp32 accumulator (as block-scaled fp8 GEMMs do). No weight becomes a float. SWAP tiles
compute the transposed product, the unpacked weight as the tensor cores' left operand straight
from registers; the others pass it through shared memory. K may be split over programs, summed in
the kernel (qgemm._split_sum).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import qgemm
from .fused import _STEPS
from .launch import autotune
from .qgemm import _split_k, _split_sum, _tile

# (BLOCK_M tokens, BLOCK_N rows, warps, stages, SWAP); BLOCK_K is the group size. None spills at
# G = 128 (compiled for sm_90a with Triton 3.9: 78-231 registers); 128 x 128 tiles and 4-warp
# 64 x 128 / 128 x 64 non-SWAP tiles did.
TILES = [(16, 64, 4, 4, False), (32, 64, 4, 4, False), (64, 64, 4, 4, False), (64, 128, 8, 3, False),
         (16, 64, 4, 4, True), (32, 64, 4, 4, True), (64, 64, 4, 4, True), (64, 128, 8, 3, True),
         (128, 64, 8, 3, True)]
CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "SWAP": swap}, num_warps=w, num_stages=s)
           for m, n, w, s, swap in TILES]


def _prune(configs, named_args, **kwargs):
    """Tiles no taller than the token count rounded up (at least 16), each whole and also with its
    split-K where that is more than 1 (qgemm._split_k)."""
    m, G = named_args["M_BUCKET"], kwargs["G"]
    fits = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)] or configs[:1]
    out = []
    for c in fits:
        split = _split_k(m, named_args["N"], named_args["Kp"], c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], G)
        out += [triton.Config(dict(c.kwargs, SPLIT_K=k), num_warps=c.num_warps, num_stages=c.num_stages)
                for k in sorted({1, split})]
    return out


@functools.lru_cache(maxsize=None)
def _max_split(m_bucket: int, N: int, Kp: int, G: int) -> int:
    """The largest split-K among the tiles the autotuner may pick (the workspace's slices)."""
    return max(c.kwargs["SPLIT_K"] for c in _prune(CONFIGS, dict(M_BUCKET=m_bucket, N=N, Kp=Kp), G=G))


@triton.jit
def _w4_planes_kernel(xq_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr, M, N, K, Kp, M_BUCKET,
                      stride_xm, stride_xp, stride_w, stride_s, stride_sg, stride_ym, HAS_BIAS: tl.constexpr,
                      G: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      SWAP: tl.constexpr, SPLIT_K: tl.constexpr = 1):
    # Grid (output tiles (see _tile), SPLIT_K): program (pid, s) sums the s-th share of the groups.
    per_split = ((Kp + G - 1) // G + SPLIT_K - 1) // SPLIT_K * G
    k_first = tl.program_id(1) * per_split
    k_last = tl.minimum(k_first + per_split, Kp)
    m0, n0 = _tile(M, N, BLOCK_M, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Rows past M / N read row 0 instead (clamped); their results are never stored.
    x_ptrs = xq_ptr + tl.where(m_ok, offs_m, 0).to(tl.int64)[:, None] * stride_xm + k_first + tl.arange(0, G)[None, :]
    rows_n = tl.where(n_ok, offs_n, 0).to(tl.int64)
    w_rows = w_ptr + rows_n[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_first, k_last, G):
        if EVEN_K:
            x1 = tl.load(x_ptrs)
            x2 = tl.load(x_ptrs + stride_xp)
        else:
            k_ok = (k0 + tl.arange(0, G)) < K
            x1 = tl.load(x_ptrs, mask=k_ok[None, :], other=0)
            x2 = tl.load(x_ptrs + stride_xp, mask=k_ok[None, :], other=0)
        x_ptrs += G
        b = tl.load(w_rows + (k0 // 2 + tl.arange(0, G // 2))[None, :]).to(tl.int32)  # Kp: whole groups
        g = k0 // G
        z = tl.load(z_ptr + rows_n * stride_s + g * stride_sg).to(tl.int32)  # integer zero points
        s = tl.load(s_ptr + rows_n * stride_s + g * stride_sg)
        q = tl.reshape(tl.join(b & 0xF, b >> 4), [BLOCK_N, G])  # k = 2 j + (0, 1)
        w = (q - z[:, None]).to(tl.int8)
        if SWAP:  # [BLOCK_N, BLOCK_M]: the weight as the left operand, from registers
            a1 = tl.dot(w, tl.trans(x1), out_dtype=tl.int32)
            a2 = tl.dot(w, tl.trans(x2), out_dtype=tl.int32)
            acc += (a1.to(tl.float32) + a2.to(tl.float32) * (1.0 / _STEPS)) * s[:, None]
        else:
            a1 = tl.dot(x1, tl.trans(w), out_dtype=tl.int32)
            a2 = tl.dot(x2, tl.trans(w), out_dtype=tl.int32)
            acc += (a1.to(tl.float32) + a2.to(tl.float32) * (1.0 / _STEPS)) * s[None, :]
    if SWAP:
        acc = tl.trans(acc)
    ok = m_ok[:, None] & n_ok[None, :]
    last = True
    if SPLIT_K > 1:
        acc, last = _split_sum(acc, part_ptr, cnt_ptr, offs_m, offs_n, M, N, ok, SPLIT_K)
    if last:
        acc = acc * tl.load(xs_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=ok)


_tuned = autotune(CONFIGS, key=["M_BUCKET", "N", "Kp", "G", "EVEN_K"],
                  prune_configs_by={"early_config_prune": _prune})(_w4_planes_kernel)


def w4a16_planes(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16) times the int4 weight (packed uint8 [N, Kp / 2], scales and integer-valued
    zeros fp32 [N, Kp / G], as fastllm.stages.quantizers.int4 stores them; K <= Kp) on the int8
    tensor cores, the activations as two int8 planes."""
    from .fused import quant_int8_planes

    M, K = x.shape
    N, Kp = packed.shape[0], packed.shape[1] * 2
    G = group_size
    assert K <= Kp and Kp % G == 0 and G % 32 == 0 and packed.stride(1) == 1
    assert scales.shape == zeros.shape == (N, Kp // G) and scales.stride() == zeros.stride()
    xq, x_scale = quant_int8_planes(x)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    m_bucket = triton.next_power_of_2(M)
    splits = config.kwargs.get("SPLIT_K", 1) if config is not None else _max_split(m_bucket, N, Kp, G)
    part = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else y
    cnt = qgemm._counters(x.device, triton.cdiv(M, 16) * triton.cdiv(N, 64)) if splits > 1 else y
    args = (xq, x_scale, packed, scales, zeros, bias if bias is not None else y, y, part, cnt, M, N, K, Kp, m_bucket,
            xq.stride(1), xq.stride(0), packed.stride(0), scales.stride(0), scales.stride(1), y.stride(0))
    flags = dict(HAS_BIAS=bias is not None, G=G, EVEN_K=K == Kp)
    if config is None:
        _tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])](
            *args, **flags)
    else:
        kw = config.kwargs
        _w4_planes_kernel[(triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"]), splits)](
            *args, **flags, **kw, num_warps=config.num_warps, num_stages=config.num_stages)
    return y

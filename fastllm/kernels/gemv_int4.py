"""Batch-1 GEMV over int4 weights (Triton): y[N] = dequant(W)[N, K] @ x[K] (+ bias).

Storage (fastllm.stages.quantizers.int4): `packed` uint8 [N, Kp / 2], two 4-bit values per byte
along K (low nibble = even k); `scales`, `zeros` fp32 [N, Kp / G], one pair per group of G
columns (asymmetric: w ~ (q - zero) * scale); Kp = K rounded up to a multiple of G. The kernel
reads each byte once and unpacks it in registers; per group it forms sum(q * x) and sum(x), so
the dequantization costs one multiply-add per group, not per weight.

Measured slower and dropped (H100, Llama-2-7B shapes, scripts/sweep_gemv.py, 2026-11-27): the
nibbles widened through float bits instead of an int-to-float instruction (8-11% slower); x split
into even and odd columns instead of interleaving the unpacked tile (15-40% slower); dequantizing
per weight with one reduction at the end (20-30% slower). The kernel reads 1.1-1.6 TB/s, well
under the card's 3 TB/s: unpacking and converting bound it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch_rows, pdl

CONFIGS = [triton.Config({"BLOCK_N": n, "GROUPS": r}, num_warps=w, num_stages=s)
           for n, r, w, s in [(4, 4, 4, 3), (8, 2, 4, 3), (8, 4, 4, 4), (16, 2, 8, 3), (2, 8, 4, 4), (4, 8, 8, 3),
                              (2, 16, 4, 3), (4, 16, 8, 3)]]


@triton.jit
def _gemv_int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, Kp, stride_w, stride_s,
                      G: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                      USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    HALF: tl.constexpr = GROUPS * G // 2  # bytes of one row per tile
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    # As in fastllm.kernels.gemv: the first tile is requested before waiting for x, each later
    # one an iteration ahead of its use.
    j = tl.arange(0, HALF)
    b = tl.load(w_rows + j[None, :], mask=row_ok[:, None] & (j < Kp // 2)[None, :], other=0,
                eviction_policy="evict_first")
    if USE_PDL:  # x comes from the kernel before (see fastllm.kernels.launch)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    for k0 in range(0, Kp, GROUPS * G):
        groups = k0 // G + tl.arange(0, GROUPS)
        g_ok = groups < Kp // G
        jn = (k0 + GROUPS * G) // 2 + tl.arange(0, HALF)
        b_next = tl.load(w_rows + jn[None, :], mask=row_ok[:, None] & (jn < Kp // 2)[None, :], other=0,
                         eviction_policy="evict_first")
        lo = (b & 0xF).to(tl.float32)
        hi = (b >> 4).to(tl.float32)
        q = tl.reshape(tl.join(lo, hi), [BLOCK_N, GROUPS, G])  # k = 2 j + (0 low, 1 high)
        cols = k0 + tl.arange(0, GROUPS * G)
        x = tl.reshape(tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32), [GROUPS, G])
        dots = tl.sum(q * x[None, :, :], axis=2)  # [BLOCK_N, GROUPS]
        xs = tl.sum(x, axis=1)  # [GROUPS]
        sz = rows[:, None] * stride_s + groups[None, :]
        m = row_ok[:, None] & g_ok[None, :]
        s = tl.load(s_ptr + sz, mask=m, other=0.0)
        z = tl.load(z_ptr + sz, mask=m, other=0.0)
        acc += s * (dots - z * xs[None, :])
        b = b_next
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


_tuned = triton.autotune(configs=CONFIGS, key=["N", "Kp", "G"])(_gemv_int4_kernel)


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """x [1, K] or [K] times the int4 weight (see the module docstring); result in x's dtype."""
    N, Kp = packed.shape[0], packed.shape[1] * 2
    K = x.shape[-1]
    assert x.numel() == K and K <= Kp and Kp % group_size == 0 and scales.shape == zeros.shape == (N, Kp // group_size)
    xv = x.reshape(K).contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    args = (xv, packed, scales, zeros, bias if bias is not None else y, y, N, K, Kp, packed.stride(0), scales.stride(0))
    flags = dict(G=group_size, HAS_BIAS=bias is not None, **pdl(x))
    launch_rows(_tuned, _gemv_int4_kernel, N, args, flags, config)
    return y.view(*x.shape[:-1], N)

"""Matrix product over weight-only quantized weights for more than one token (Triton):
y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias), with W dequantized tile by tile in registers and
multiplied on the tensor cores in x's dtype; the bf16 weight is never written to memory.

Weights:
- row-scaled (int8 or fp8 [N, K], fp32 scale [N]): the tile is converted exactly to x's dtype and
  the scale applied to the fp32 result (fastllm.stages.quantizers.int8 / fp8);
- int4 (packed uint8 [N, Kp / 2], two values per byte along K, low nibble first; fp32 scales and
  zeros [N, Kp / G]): each value becomes (q - zero) * scale in fp32, rounded to x's dtype, as
  fastllm.stages.quantizers.int4.dequantize_int4 does.

Tiles are autotuned per (M rounded up to a power of two, N, K), and with them SWAP (y^T = W x^T,
the dequantized weight as the left operand, which Hopper's wgmma can read from registers). The
grid walks N tiles in bands so that programs running together share x rows in L2.

Split-K: with few tokens a layer has few output tiles (o_proj at 64 tokens: 32 of 64 x 128),
too few programs to stream the weight at the card's bandwidth. There each tile's K range is
split over SPLIT_K programs (`_split_k`: about two programs per SM). Each writes its fp32 partial
sum to its own slice of a workspace and counts itself in on the tile's counter; the program that
arrives last sums the slices in split order, adds the bias and stores the tile. No buffer to zero
and no pass after the kernel (two launches fewer per product), and the result is the same bit for
bit from call to call. The counters (`_counters`: one zeroed buffer per device and stream, the
last program of a tile sets its counter back to zero) let products on one stream share them.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .dequant import dequantize_int4, dequantize_rows  # noqa: F401 (the layers call them through qgemm)
from .gemv import _weight_f32
from .launch import autotune

# SWAP: y^T = W x^T, so the dequantized weight tile is the left operand (which Hopper's wgmma can
# take from registers) and only x passes through shared memory.
CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SWAP": sw}, num_warps=w, num_stages=s)
           for m, n, k, w, s, sw in [(16, 64, 128, 4, 4, False), (16, 128, 128, 4, 3, False), (32, 128, 128, 4, 3, False),
                                     (64, 128, 128, 4, 3, False), (128, 128, 64, 8, 3, False), (128, 256, 64, 8, 3, False),
                                     (16, 64, 128, 4, 4, True), (16, 128, 128, 4, 3, True), (32, 128, 128, 4, 3, True),
                                     (64, 128, 128, 4, 3, True), (128, 128, 64, 8, 3, True), (64, 256, 64, 8, 3, True),
                                     (128, 256, 64, 8, 3, True), (256, 128, 64, 8, 3, True),
                                     # BLOCK_K 128 (int4 at g128 takes no other) in 8 warps or on 64 weight rows:
                                     # 4 warps on 128 x 128 hold the int4 tile in 255 registers, spilling (Triton 3.9, sm_90)
                                     (64, 128, 128, 8, 3, True), (64, 128, 128, 8, 3, False), (64, 64, 128, 4, 4, True),
                                     (32, 64, 128, 4, 4, True), (128, 128, 128, 8, 3, True)]]


SPLIT_K_MAX_TOKENS = 256  # above this, layers have tiles enough to fill the card


@functools.lru_cache(maxsize=None)
def _sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count \
        if torch.cuda.is_available() else 4


def _split_k(m_bucket: int, N: int, Kw: int, block_m: int, block_n: int, block_k: int) -> int:
    """Programs per output tile: a power of two that brings the grid to about two programs per
    SM, each keeping at least four BLOCK_K steps; 1 above SPLIT_K_MAX_TOKENS tokens."""
    if m_bucket > SPLIT_K_MAX_TOKENS:
        return 1
    tiles = triton.cdiv(max(m_bucket, 1), block_m) * triton.cdiv(N, block_n)
    split = 1
    while tiles * split * 2 <= 2 * _sms() and triton.cdiv(Kw, block_k) >= 8 * split and split < 16:
        split *= 2
    return split


@functools.lru_cache(maxsize=None)
def _max_split(m_bucket: int, N: int, Kw: int, int4: bool, G: int, max_tokens: int) -> int:
    """The largest split-K among the tiles the autotuner may pick (the workspace holds that many
    slices); cached, as it runs on every GEMM call (max_tokens: SPLIT_K_MAX_TOKENS, part of the key)."""
    if m_bucket > max_tokens:
        return 1
    return max(c.kwargs["SPLIT_K"] for c in _prune(CONFIGS, dict(G=G, INT4=int4, M_BUCKET=m_bucket, N=N, Kw=Kw)))


_COUNTERS: dict = {}


def _counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Split-K's per-tile arrival counters for device's current stream: zeroed once, and each
    tile's last program sets its counter back to zero, so the products of one stream share them
    (those of a CUDA graph's capture stream get their own)."""
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    cnt = _COUNTERS.get(key)
    if cnt is None or cnt.numel() < tiles:
        cnt = _COUNTERS[key] = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
    return cnt


def _prune(configs, named_args, **kwargs):
    """int4 tiles hold whole groups; tiles no wider than the problem (after rounding M up); each
    with its split-K (_split_k)."""
    g = named_args["G"] if "G" in named_args else kwargs.get("G", 1)
    int4 = named_args.get("INT4", kwargs.get("INT4", False))
    m = named_args["M_BUCKET"]
    fits = [c for c in configs if not int4 or c.kwargs["BLOCK_K"] % g == 0]
    fits = [c for c in fits if c.kwargs["BLOCK_M"] <= max(16, m)] or fits
    out = []
    for c in fits:
        kw = dict(c.kwargs, SPLIT_K=_split_k(m, named_args["N"], named_args["Kw"], c.kwargs["BLOCK_M"],
                                              c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]))
        out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output tile (first row, first column) of an [M, N] product, from axis 0 of
    the grid: N tiles walked in bands of GROUP_N, so programs running together share x rows in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    GROUP_N: tl.constexpr = 8
    band = pid // (GROUP_N * num_m)
    first_n = band * GROUP_N
    width = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % (GROUP_N * num_m)) % width
    pid_m = (pid % (GROUP_N * num_m)) // width
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _split_sum(acc, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, ok, SPLIT_K: tl.constexpr):
    """Split-K inside the kernel, for grid axis 1 = split: this program's fp32 partial sum goes to its
    workspace slice [M, N] and it counts itself in on its tile's counter (axis 0); the last to
    arrive gets (the tile's whole sum, True), the others (acc, False). The last adds the slices in
    split order, whichever came last (the same bits every call), and sets the counter back to zero."""
    cell = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * M * N + cell, acc, mask=ok)
    tl.debug_barrier()  # every thread's slice stored before the count (released at GPU scope)
    arrived = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLIT_K - 1
    if last:
        acc = tl.load(ws_ptr + cell, mask=ok, other=0.0, cache_modifier=".cg")
        for s in range(1, SPLIT_K):
            acc += tl.load(ws_ptr + s * M * N + cell, mask=ok, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tl.program_id(0), 0, sem="relaxed", scope="gpu")  # ready for the next product
    return acc, last


@triton.jit
def _dot_acc(acc, w, x, SWAP: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, dtype: tl.constexpr):
    """acc + x w^T ([M, N]), or with SWAP acc + w x^T ([N, M])."""
    if UPCAST:  # Triton's CPU interpreter: bf16 dot operands (and casts to bf16) go wrong; fp32 there
        w, x = w.to(tl.float32), x.to(tl.float32)
        if SWAP:
            return acc + tl.dot(w, tl.trans(x), input_precision="ieee")
        else:
            return acc + tl.dot(x, tl.trans(w), input_precision="ieee")
    else:
        w = w.to(dtype)
        if SWAP:
            return acc + tl.dot(w, tl.trans(x), input_precision=DOT_PRECISION)
        else:
            return acc + tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)


@triton.jit
def _qgemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, Kw, M_BUCKET, stride_xm, stride_w,
                  stride_s, stride_sg, stride_ym, INT4: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
                  UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
                  SPLIT_K: tl.constexpr = 1, EVEN_K: tl.constexpr = False):
    # Grid (output tiles, SPLIT_K): program (pid, s) sums the s-th share of K's BLOCK_K steps.
    per_split = ((Kw + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K  # (no tl.cdiv: see paged_attention)
    k_first = tl.program_id(1) * per_split
    k_last = tl.minimum(k_first + per_split, Kw)
    m0, n0 = _tile(M, N, BLOCK_M, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Rows past M / N read row 0 instead (clamped), so loads need no row mask; their results are
    # never stored. With EVEN_K (every K step whole) the loads have no mask at all.
    x_ptrs = (x_ptr + tl.where(m_ok, offs_m, 0).to(tl.int64)[:, None] * stride_xm
              + k_first + tl.arange(0, BLOCK_K)[None, :])
    w_rows = w_ptr + tl.where(n_ok, offs_n, 0).to(tl.int64)[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_first, k_last, BLOCK_K):  # Kw: K, or for int4 the padded Kp (a multiple of G)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(offs_k < K)[None, :], other=0.0)
        x_ptrs += BLOCK_K
        if INT4:
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            KB = tl.multiple_of(Kw // 2, 16)  # bytes per row (Kp is a multiple of G >= 32): 16-byte loads
            if EVEN_K:
                b = tl.load(w_rows + j[None, :]).to(tl.int32)
            else:
                b = tl.load(w_rows + j[None, :], mask=(j < KB)[None, :], other=0).to(tl.int32)
            # nibbles to fp32 through the float's bits (2^23 + q - 2^23: exact, no conversion instruction)
            lo = ((b & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True)
            q = tl.reshape(tl.join(lo, hi), [BLOCK_N, BLOCK_K])  # k = 2 j + (0, 1)
            GROUPS: tl.constexpr = BLOCK_K // G
            g = k0 // G + tl.arange(0, GROUPS)
            sz = offs_n[:, None] * stride_s + g[None, :] * stride_sg
            sz_ok = n_ok[:, None] & (g * G < Kw)[None, :]  # a last tile past Kp: no groups there to read
            s = tl.load(s_ptr + sz, mask=sz_ok, other=0.0)
            z = tl.load(z_ptr + sz, mask=sz_ok, other=0.0) + 8388608.0
            w = tl.reshape((tl.reshape(q, [BLOCK_N, GROUPS, G]) - z[:, :, None]) * s[:, :, None],
                           [BLOCK_N, BLOCK_K])
        else:
            if EVEN_K:
                w = tl.load(w_rows + offs_k[None, :])
            else:
                w = tl.load(w_rows + offs_k[None, :], mask=(offs_k < K)[None, :], other=0.0)
            w = _weight_f32(w, True)  # int8 through the float's bits, as the GEMV does
        acc = _dot_acc(acc, w, x, SWAP, UPCAST, DOT_PRECISION, x_ptr.dtype.element_ty)
    if SWAP:  # [BLOCK_N, BLOCK_M] -> [BLOCK_M, BLOCK_N]
        acc = tl.trans(acc)
    if not INT4:
        acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    last = True
    if SPLIT_K > 1:
        acc, last = _split_sum(acc, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, ok, SPLIT_K)
    if last:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=ok)


_tuned = autotune(CONFIGS, key=["M_BUCKET", "N", "K", "INT4", "G"],
                  prune_configs_by={"early_config_prune": _prune})(_qgemm_kernel)


def _launch(x, w, s, z, bias, N, Kw, int4, G, config):
    M, K = x.shape
    assert x.stride(1) == 1 and w.stride(1) == 1
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    m_bucket = triton.next_power_of_2(M)
    splits = (config.kwargs.get("SPLIT_K", 1) if config is not None
              else _max_split(m_bucket, N, Kw, int4, G, SPLIT_K_MAX_TOKENS))
    # split-K: a workspace slice [M, N] per split, and a counter per output tile (16 x 64 the smallest)
    ws = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else y
    cnt = _counters(x.device, triton.cdiv(M, 16) * triton.cdiv(N, 64)) if splits > 1 else y
    upcast = type(_qgemm_kernel).__name__ == "InterpretedFunction" and x.dtype != torch.float32
    args = (x, w, s, z if z is not None else s, bias if bias is not None else y, y, ws, cnt, M, N, K, Kw,
            m_bucket, x.stride(0), w.stride(0), s.stride(0), s.stride(-1), y.stride(0))
    # fp32 inputs: tf32x3 (near-fp32 on the tensor cores); plain tf32 is too coarse
    # EVEN_K: every K step of every tile whole (each BLOCK_K divides 256), so loads need no mask
    flags = dict(INT4=int4, G=G, HAS_BIAS=bias is not None, UPCAST=upcast, EVEN_K=Kw % 256 == 0 and K == Kw,
                 DOT_PRECISION="tf32x3" if x.dtype == torch.float32 else "tf32")
    if config is None:
        _tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])](
            *args, **flags)
    else:
        kw = config.kwargs
        _qgemm_kernel[(triton.cdiv(M, kw["BLOCK_M"]) * triton.cdiv(N, kw["BLOCK_N"]), kw.get("SPLIT_K", 1))](
            *args, **flags, **kw, num_warps=config.num_warps, num_stages=config.num_stages)
    return y


def qgemm_rows(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               config: triton.Config | None = None) -> torch.Tensor:
    """x [M, K] (bf16, fp16 or fp32) times a row-scaled int8 or fp8 weight q [N, K] (w = q * scale[n])."""
    N, K = qweight.shape
    assert x.dim() == 2 and x.shape[1] == K and scale.shape == (N,)
    return _launch(x, qweight, scale, None, bias, N, K, False, 1, config)


def qgemm_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, config: triton.Config | None = None) -> torch.Tensor:
    """x [M, K] times the int4 weight of fastllm.stages.quantizers.int4 (K <= Kp, zero-padded)."""
    N, Kp = packed.shape[0], packed.shape[1] * 2
    assert x.dim() == 2 and x.shape[1] <= Kp and Kp % group_size == 0 and group_size % 32 == 0
    assert scales.shape == zeros.shape == (N, Kp // group_size) and scales.stride() == zeros.stride()
    return _launch(x, packed, scales, zeros, bias, N, Kp, True, group_size, config)

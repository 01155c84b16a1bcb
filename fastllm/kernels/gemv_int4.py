"""Batch-1 GEMV over int4 weights (Triton): y[N] = dequant(W)[N, K] @ x[K] (+ bias).

Storage (fastllm.stages.quantizers.int4): `packed` uint8 [N, Kp / 2], two 4-bit values per byte
along K (low nibble = even k); `scales`, `zeros` fp32 [N, Kp / G] (any strides), one pair per
group of G columns (asymmetric: w ~ (q - zero) * scale); Kp = K rounded up to a multiple of G.
Int4Linear keeps the pairs interleaved (`pairs`, [N, groups rounded up to even, 2]).

Two kernels:
- `_gemv_int4_words_kernel` (the default, `WORDS = True`): reads int32 words (8 values of one
  group) and unpacks with one instruction per value and no conversion instruction: a mask (and
  shift) per word, then each nibble placed in the mantissa of 128.0 by PTX prmt, giving 128 + q
  exactly; per word, sum((128 + q) x) - (128 + zero) sum(x) is scaled by the group's scale, with
  no reduction across threads until the end (about 4 instructions per weight). The next tile's
  words, inputs and (scale, zero) pairs are requested an iteration before their use; the pairs
  come in one 16-byte load per two groups of a row.
- `_gemv_int4_kernel` (`WORDS = False`): reads the bytes, unpacks them in registers, and per
  group forms sum(q * x) and sum(x) (about 8 instructions per weight).

On Hopper and later (`TMA = True`), Int4Linear's GEMV (interleaved pairs, no SiLU fusion) runs
`_gemv_int4_tma_kernel`: the word kernel's arithmetic, with the words and pairs brought in by TMA
(tensor descriptors) and pipelined 3-5 tiles deep in shared memory by Triton, where the word
kernel's register prefetch held one tile per program (its occupancy was bound by registers). On
an H100 it moved the Llama-2-7B int4 step from 1.78x to 1.97-2.00x bf16's speed (two calls,
scripts/quant_gpu.py), the gate_up GEMV from 27.6 to 23.2 us. With `DP4A = True` (the default,
16-bit inputs) it runs in integer arithmetic (`_int4_tile_dp4a`): 2.02x in two calls, against
1.99x in floats with their own best tiles.

Measured on an H100 (2026-11-27, scripts/sweep_gemv.py and scripts/quant_gpu.py, Llama-2-7B
shapes, docs/quantization.md): with separate scale and zero loads issued in the iteration that
used them, the word kernel read 1.2-1.6 TB/s, no better than the row kernel, and skipping those
loads (NO_SZ, a benchmark-only switch) made it 15-25% faster. The SASS showed 4 scale / zero
loads per 8 weight loads, each waited on within its iteration. Interleaving them (one load) and
requesting them an iteration ahead brought the word kernel to 1.3-1.9 TB/s and the batch-1
step from 1.62x (row kernel) to 1.76-1.78x bf16's speed.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from triton.tools.tensor_descriptor import TensorDescriptor

from . import cuda_gemv
from .gemv_common import _after_wait
from .int4_tiles import _int4_scales, _int4_tile, _int4_tile_dp4a
from .launch import autotune, launch_rows, pdl, tma_supported

WORDS = True  # the word kernel (False: the row kernel; benchmarks switch it to compare)
# With pairs and bf16 inputs, the CUDA GEMV (fastllm.kernels.cuda_gemv, cuda/gemv_int4.cu) where it
# builds. Off: prepared and tested against float64, not yet timed on a GPU (scripts/quant_gpu.py
# kind "int4-cuda").
CUDA = False

CONFIGS = [triton.Config({"BLOCK_N": n, "GROUPS": r}, num_warps=w, num_stages=s)
           for n, r, w, s in [(4, 4, 4, 3), (8, 2, 4, 3), (8, 4, 4, 4), (16, 2, 8, 3), (2, 8, 4, 4), (4, 8, 8, 3),
                              (2, 16, 4, 3), (4, 16, 8, 3)]]


@triton.jit
def _gemv_int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, Kp, stride_w, stride_sn, stride_sg,
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
    KB = tl.multiple_of(Kp // 2, 16)  # bytes per row (Kp is a multiple of G >= 32): loads stay 16 bytes wide
    b = tl.load(w_rows + j[None, :], mask=row_ok[:, None] & (j < KB)[None, :], other=0,
                eviction_policy="evict_first")
    if USE_PDL:  # x comes from the kernel before (see fastllm.kernels.launch)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    for k0 in range(0, Kp, GROUPS * G):
        groups = k0 // G + tl.arange(0, GROUPS)
        g_ok = groups < Kp // G
        jn = (k0 + GROUPS * G) // 2 + tl.arange(0, HALF)
        b_next = tl.load(w_rows + jn[None, :], mask=row_ok[:, None] & (jn < KB)[None, :], other=0,
                         eviction_policy="evict_first")
        lo = (b & 0xF).to(tl.float32)
        hi = (b >> 4).to(tl.float32)
        q = tl.reshape(tl.join(lo, hi), [BLOCK_N, GROUPS, G])  # k = 2 j + (0 low, 1 high)
        cols = k0 + tl.arange(0, GROUPS * G)
        x = tl.reshape(tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32), [GROUPS, G])
        dots = tl.sum(q * x[None, :, :], axis=2)  # [BLOCK_N, GROUPS]
        xs = tl.sum(x, axis=1)  # [GROUPS]
        sz = rows[:, None] * stride_sn + groups[None, :] * stride_sg
        m = row_ok[:, None] & g_ok[None, :]
        s = tl.load(s_ptr + sz, mask=m, other=0.0)
        z = tl.load(z_ptr + sz, mask=m, other=0.0)
        acc += s * (dots - z * xs[None, :])
        b = b_next
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


# BLOCK_W: words (8 values) per row of a tile; rows of a program stay in each thread's registers
WORD_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": bw}, num_warps=w, num_stages=1)
           for n, bw, w in [(8, 512, 4), (8, 256, 2), (4, 512, 4), (4, 256, 2), (8, 128, 1), (16, 256, 4),
                            (2, 512, 4), (16, 512, 8), (4, 128, 1), (8, 512, 8),
                            (4, 64, 1), (8, 64, 1), (16, 64, 1), (2, 128, 1), (16, 128, 2), (32, 128, 4),
                            (4, 32, 1), (8, 32, 1), (2, 64, 1)]]


@triton.jit
def _gemv_int4_words_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, N, K, Kp, stride_w, stride_sn,
                            stride_sg,
                            G: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_W: tl.constexpr, USE_PDL: tl.constexpr, PAIRS: tl.constexpr = False,
                            SILU_MUL: tl.constexpr = False, NO_SZ: tl.constexpr = False):
    """w_ptr: the packed bytes viewed as int32 [N, Kp / 8]; stride_w counts words. Scales and
    zeros at s_ptr / z_ptr + row * stride_sn + group * stride_sg (PAIRS: interleaved at s_ptr,
    see _int4_scales). SILU_MUL: x_ptr holds [gate, up] (2 K) and the input is silu(gate) * up,
    rounded to x's dtype as the separate kernel rounds it. NO_SZ (benchmarks only: wrong results)
    skips the scale loads, to measure what they cost."""
    pid = tl.program_id(0)
    W: tl.constexpr = G // 8  # words per group
    GROUPS: tl.constexpr = BLOCK_W // W
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs = tl.arange(0, GROUPS)[:, None] * W + tl.arange(0, W)[None, :]  # [GROUPS, W] words of a tile
    w_rows = w_ptr + rows.to(tl.int64)[:, None, None] * stride_w
    nwords = tl.multiple_of(Kp // 8, 4)  # Kp is a multiple of G >= 32: the word loads stay 16 bytes wide
    # As in fastllm.kernels.gemv: the first tile is requested before waiting for x, each later
    # one an iteration ahead of its use.
    wt = tl.load(w_rows + offs[None], mask=row_ok[:, None, None] & (offs < nwords)[None], other=0,
                 eviction_policy="evict_first")
    sz = _int4_scales(s_ptr, z_ptr, rows, row_ok, 0, Kp, stride_sn, stride_sg, G, GROUPS, PAIRS, NO_SZ)
    if USE_PDL:  # x comes from the kernel before (see fastllm.kernels.launch)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    kx = (8 * offs)[:, :, None] + tl.arange(0, 8)[None, None, :]  # [GROUPS, W, 8]: columns of a tile
    xt = tl.load(x_ptr + kx, mask=kx < K, other=0.0)
    ut = tl.load(x_ptr + K + kx, mask=kx < K, other=0.0) if SILU_MUL else xt
    acc = tl.zeros((BLOCK_N, GROUPS, W), dtype=tl.float32)
    for k0 in range(0, Kp, BLOCK_W * 8):
        # the next tile's words, inputs, scales and zeros are requested before this one is used
        nxt = k0 // 8 + BLOCK_W + offs
        wn = tl.load(w_rows + nxt[None], mask=row_ok[:, None, None] & (nxt < nwords)[None], other=0,
                     eviction_policy="evict_first")
        kn = k0 + BLOCK_W * 8 + kx
        xn = tl.load(x_ptr + kn, mask=kn < K, other=0.0)
        un = tl.load(x_ptr + K + kn, mask=kn < K, other=0.0) if SILU_MUL else xn
        szn = _int4_scales(s_ptr, z_ptr, rows, row_ok, tl.multiple_of(k0 // G + GROUPS, GROUPS), Kp, stride_sn,
                           stride_sg, G, GROUPS, PAIRS, NO_SZ)
        xx = xt.to(tl.float32)
        if SILU_MUL:
            xx = (xx / (1.0 + tl.exp(-xx)) * ut.to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
        if NO_SZ:
            sz = tl.join(tl.full((BLOCK_N, GROUPS), 1.0, tl.float32), tl.full((BLOCK_N, GROUPS), 8.0, tl.float32))
        acc = _int4_tile(acc, wt, xx, sz, GROUPS, W, ASM)
        wt, xt, ut, sz = wn, xn, un, szn
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_int4_tma_kernel(x_ptr, w_desc, sz_desc, b_ptr, y_ptr, N, K, Kp,
                          G: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_W: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr,
                          DP4A: tl.constexpr = False, HEAD_START: tl.constexpr = 0, SILU_MUL: tl.constexpr = False):
    """The word kernel's arithmetic (DP4A: _int4_tile_dp4a's) with the weights and (scale, zero)
    pairs brought in by TMA: w_desc over the words (int32 [N, Kp / 8], block [BLOCK_N, BLOCK_W]),
    sz_desc over the pairs (fp32 [N, 2 * groups rounded up to even], block [BLOCK_N, 2 * GROUPS]).
    Triton pipelines the loop STAGES deep in shared memory, so the bytes in flight do not cost
    registers (the word kernel's register prefetch holds one tile per program). Rows past N read
    as zeros. HEAD_START: the PDL wait inside the loop, as in gemv_bytes._gemv_bytes_tma_kernel.
    SILU_MUL: x_ptr holds [gate, up] (2 K), and the input is silu(gate) * up, rounded to x's dtype
    as the separate kernel rounds it (each program computes it for the columns it reads)."""
    pid = tl.program_id(0)
    W: tl.constexpr = G // 8
    GROUPS: tl.constexpr = BLOCK_W // W
    row0 = pid * BLOCK_N
    offs = tl.arange(0, GROUPS)[:, None] * W + tl.arange(0, W)[None, :]
    kx = (8 * offs)[:, :, None] + tl.arange(0, 8)[None, None, :]  # [GROUPS, W, 8]: columns of a tile
    if USE_PDL and not HEAD_START:  # x comes from the kernel before; the pipeline's first loads wait too
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_N, GROUPS, W), dtype=tl.float32)
    for k0 in tl.range(0, Kp, BLOCK_W * 8, num_stages=STAGES):
        wt = tl.reshape(w_desc.load([row0, k0 // 8]), [BLOCK_N, GROUPS, W])
        sz = tl.reshape(sz_desc.load([row0, 2 * (k0 // G)]), [BLOCK_N, GROUPS, 2])
        k_x = k0
        if USE_PDL and HEAD_START:  # (see _gemv_bytes_tma_kernel)
            k_x = _after_wait(k0, BLOCK_W * 8, wt, HEAD_START)
        kk = k_x + kx
        xt = tl.load(x_ptr + kk, mask=kk < K, other=0.0)
        if SILU_MUL:
            gate = xt.to(tl.float32)
            up = tl.load(x_ptr + K + kk, mask=kk < K, other=0.0).to(tl.float32)
            xt = (gate / (1.0 + tl.exp(-gate)) * up).to(x_ptr.dtype.element_ty)
        xt = xt.to(tl.float32)
        if DP4A:
            acc = _int4_tile_dp4a(acc, wt, xt, sz, GROUPS, W, ASM)
        else:
            acc = _int4_tile(acc, wt, xt, sz, GROUPS, W, ASM)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def _prune_words(configs, named_args, **kwargs):
    """A tile row of the word kernel holds whole groups."""
    g = named_args.get("G", kwargs.get("G"))
    return [c for c in configs if c.kwargs["BLOCK_W"] * 8 % g == 0]


# The word kernel's best configuration per card and shape (N, Kp, G), as scripts/sweep_gemv.py
# measures it (chained under PDL, eight weight copies rotated, as a decode step runs them), used
# instead of the autotuner where card and shape match. The autotuner times each configuration
# alone, and its picks moved an H100's Llama-2-7B int4 step between 323.9 and 360.7 tok/s across
# runs (2026-11-27). (BLOCK_N, BLOCK_W, num_warps), from the H100 sweep of that day.
PINNED_WORDS = {("NVIDIA H100 80GB HBM3", 12288, 4096, 128): (8, 64, 1),
                ("NVIDIA H100 80GB HBM3", 4096, 4096, 128): (16, 256, 4),
                ("NVIDIA H100 80GB HBM3", 22016, 4096, 128): (16, 64, 1),
                ("NVIDIA H100 80GB HBM3", 4096, 11008, 128): (16, 256, 4)}


@functools.lru_cache(maxsize=None)
def _pinned(device: torch.device, N: int, Kp: int, G: int) -> triton.Config | None:
    if device.type != "cuda":
        return None
    hit = PINNED_WORDS.get((torch.cuda.get_device_name(device), N, Kp, G))
    return None if hit is None else triton.Config({"BLOCK_N": hit[0], "BLOCK_W": hit[1]}, num_warps=hit[2],
                                                  num_stages=1)


def _tma_blocks(nargs: dict) -> None:
    """Autotuner pre-hook of the TMA kernel: the descriptors' blocks follow the configuration."""
    bn, bw = nargs["BLOCK_N"], nargs["BLOCK_W"]
    nargs["w_desc"].block_shape = [bn, bw]
    nargs["sz_desc"].block_shape = [bn, 2 * bw * 8 // nargs["G"]]


def _prune_tma(configs, named_args, **kwargs):
    """Whole groups per tile, and at least two (the pairs' TMA block is 16 bytes or more)."""
    g = named_args.get("G", kwargs.get("G"))
    return [c for c in configs if c.kwargs["BLOCK_W"] * 8 % g == 0 and c.kwargs["BLOCK_W"] * 8 // g >= 2]


# (BLOCK_N, BLOCK_W, num_warps, STAGES); the first H100 sweep (2026-11-27) had (32, 64, 2-4, 3-5)
# best on every Llama-2-7B shape
TMA_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": bw, "STAGES": st}, num_warps=w, num_stages=1,
                             pre_hook=_tma_blocks)
               for n, bw, w, st in [(8, 64, 1, 3), (16, 64, 2, 3), (32, 64, 2, 3), (32, 64, 4, 3), (32, 64, 4, 5),
                                    (64, 64, 4, 3), (64, 64, 8, 4), (32, 128, 4, 3), (16, 128, 2, 3),
                                    (64, 32, 4, 4), (32, 32, 2, 4), (128, 32, 8, 3)]]
TMA = True  # on Hopper and later, pairs-stored weights go through the TMA kernel (benchmarks switch it)
DP4A = True  # the TMA kernel in integer arithmetic (_int4_tile_dp4a; benchmarks switch it)
# The TMA kernel requests weight tiles before the PDL wait, while the kernel before still runs
# (HEAD_START: 0 no, 1 the first tile, 2 the pipeline's whole prologue; see gemv_common._after_wait;
# benchmarks switch it). H100, Llama-2-7B int4 step (scripts/quant_gpu.py, two calls, 2026-11-27):
# 1 gave 421.9 and 417.0 tok/s against 397.3 and 401.8 with 0, bf16 201.3 / 201.7. 2: not yet measured.
HEAD_START = 1
# As PINNED_WORDS, for the TMA kernel in integer arithmetic (DP4A; scripts/sweep_tma.py, H100, 2026-11-27,
# the sweep's "int4 dp4a" rows; the autotuner's picks were up to 26% slower, and the float arithmetic's
# best ones cost the dp4a kernel 10% end to end): (BLOCK_N, BLOCK_W, num_warps, STAGES)
PINNED_TMA = {("NVIDIA H100 80GB HBM3", 12288, 4096, 128): (32, 64, 2, 3),
              ("NVIDIA H100 80GB HBM3", 4096, 4096, 128): (16, 128, 2, 3),
              ("NVIDIA H100 80GB HBM3", 22016, 4096, 128): (32, 64, 2, 3),
              ("NVIDIA H100 80GB HBM3", 4096, 11008, 128): (32, 128, 4, 3),
              # H200 (scripts/sweep_tma.py --int4-only --dp4a-only, 2026-11-28): the sweep's best per layer. The
              # int4 step (scripts/quant_gpu.py "-pin" / "-nopin", one call): 514.9 and 522.2 tok/s with them,
              # 471.0 and 520.2 autotuned in each run (the autotuner's picks for o_proj and down_proj move)
              ("NVIDIA H200", 12288, 4096, 128): (32, 128, 4, 3),
              ("NVIDIA H200", 4096, 4096, 128): (32, 128, 4, 3),
              ("NVIDIA H200", 22016, 4096, 128): (32, 64, 2, 3),
              ("NVIDIA H200", 4096, 11008, 128): (32, 128, 4, 3)}


@functools.lru_cache(maxsize=None)
def _pinned_tma(device: torch.device, N: int, Kp: int, G: int) -> triton.Config | None:
    hit = PINNED_TMA.get((torch.cuda.get_device_name(device), N, Kp, G)) if device.type == "cuda" else None
    return None if hit is None else triton.Config({"BLOCK_N": hit[0], "BLOCK_W": hit[1], "STAGES": hit[3]},
                                                  num_warps=hit[2], num_stages=1)

_tuned = autotune(CONFIGS, key=["N", "Kp", "G"])(_gemv_int4_kernel)
_tuned_words = autotune(WORD_CONFIGS, key=["N", "Kp", "G"],
                               prune_configs_by={"early_config_prune": _prune_words})(_gemv_int4_words_kernel)
_tuned_tma = autotune(TMA_CONFIGS, key=["N", "Kp", "G", "SILU_MUL"],
                             prune_configs_by={"early_config_prune": _prune_tma})(_gemv_int4_tma_kernel)
INTERPRETED = type(_gemv_int4_kernel).__name__ == "InterpretedFunction"  # no inline PTX there


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None, config: triton.Config | None = None,
              words: bool | None = None, pairs: torch.Tensor | None = None, silu_mul: bool = False,
              tma: bool | None = None, dp4a: bool | None = None, cuda: bool | None = None) -> torch.Tensor:
    """x [1, K] or [K] times the int4 weight (see the module docstring); result in x's dtype.
    words: the word kernel (default: the module's WORDS); config: one of its configurations;
    pairs: the same scales and zeros interleaved (fastllm.stages.quantizers.int4.pack_scales), which
    the word kernel reads in 16-byte loads; silu_mul (word and TMA kernels): x is [gate, up]
    ([1, 2K]) and the layer's input is silu(gate) * up. tma: with pairs, the TMA kernel
    (default: the module's TMA, on CUDA devices of compute capability 9.0 and later); dp4a: the TMA
    kernel in integer arithmetic, for 16-bit inputs (default: the module's DP4A); cuda: with pairs and
    bf16 inputs, the CUDA GEMV where it builds (default: the module's CUDA, unless config, words or
    tma asks for a Triton kernel)."""
    N, Kp = packed.shape[0], packed.shape[1] * 2
    K = x.shape[-1] // 2 if silu_mul else x.shape[-1]
    assert x.numel() == (2 * K if silu_mul else K) and K <= Kp and Kp % group_size == 0
    assert scales.shape == zeros.shape == (N, Kp // group_size)
    assert group_size % 32 == 0  # the kernels' 16-byte loads rely on it
    assert scales.stride() == zeros.stride() and packed.stride(1) == 1
    xv = x.reshape(-1).contiguous()
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    b = bias if bias is not None else y
    flags = dict(G=group_size, HAS_BIAS=bias is not None, **pdl(x))
    if pairs is not None:
        ng = Kp // group_size
        assert pairs.shape == (N, ng + ng % 2, 2) and pairs.is_contiguous() and pairs.dtype == torch.float32
    if cuda is None:
        cuda = CUDA and config is None and words is None and tma is None
    if (cuda and pairs is not None and x.device.type == "cuda" and cuda_gemv.fits_int4(xv, packed, pairs, group_size, silu_mul)
            and cuda_gemv.available(x)):
        y = cuda_gemv.gemv_int4(xv, packed, pairs, group_size, bias, silu_mul, use_pdl=flags["USE_PDL"])
        return y.view(*x.shape[:-1], N)
    if tma is None:  # (a pinned configuration of another kernel has no STAGES)
        tma = TMA and tma_supported(x) and words is None and (config is None or "STAGES" in config.kwargs)
    if tma and pairs is not None:
        assert packed.stride(0) % 16 == 0 and packed.data_ptr() % 16 == 0
        w_desc = TensorDescriptor.from_tensor(packed.view(torch.int32), [1, 4])  # blocks: set per configuration
        sz_desc = TensorDescriptor.from_tensor(pairs.view(N, -1), [1, 4])
        args = (xv, w_desc, sz_desc, b, y, N, K, Kp)
        config = config or _pinned_tma(x.device, N, Kp, group_size)
        if config is not None:
            _tma_blocks(dict(w_desc=w_desc, sz_desc=sz_desc, G=group_size, **config.kwargs))
        dp4a = (DP4A if dp4a is None else dp4a) and x.dtype != torch.float32  # fp32 inputs keep their bits
        launch_rows(_tuned_tma, _gemv_int4_tma_kernel, N, args,
                    flags | dict(ASM=not INTERPRETED, DP4A=dp4a, HEAD_START=HEAD_START, SILU_MUL=silu_mul), config)
    elif WORDS if words is None else words:
        assert packed.stride(0) % 4 == 0 and packed.data_ptr() % 16 == 0
        w = packed.view(torch.int32)  # [N, Kp / 8]
        if pairs is not None:
            args = (xv, w, pairs, pairs, b, y, N, K, Kp, w.stride(0), pairs.stride(0), 2)
        else:
            args = (xv, w, scales, zeros, b, y, N, K, Kp, w.stride(0), *scales.stride())
        launch_rows(_tuned_words, _gemv_int4_words_kernel, N, args,
                    flags | dict(ASM=not INTERPRETED, PAIRS=pairs is not None, SILU_MUL=silu_mul),
                    config or _pinned(x.device, N, Kp, group_size))
    else:
        assert not silu_mul, "silu_mul: the word kernel only"
        args = (xv, packed, scales, zeros, b, y, N, K, Kp, packed.stride(0), *scales.stride())
        launch_rows(_tuned, _gemv_int4_kernel, N, args, flags, config)
    return y.view(*x.shape[:-1], N)

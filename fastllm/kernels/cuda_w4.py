"""int4 weight-only products of a few tokens on the tensor cores (cuda/gemm_w4_mma.cu says how it
computes): y [M, N] = x @ dequant(W)^T (+ bias) for fastllm.stages.quantizers.int4's storage in
groups of 128, x and y bf16.

Built with nvcc on first use into the kernel cache, as fastllm.kernels.cuda_gemv builds its GEMVs,
for compute capability 8.0+ (mma.sync on bf16), and checked against float64 on a first small
product outside CUDA-graph capture; where it cannot be, `available` is False (the reason logged
once) and the layers keep the Triton GEMM.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess

import torch

from . import cuda_gemv

log = logging.getLogger(__name__)
SOURCE = cuda_gemv.SOURCE_DIR / "gemm_w4_mma.cu"
GROUP = 128  # the only group size the kernel takes
WARPS = 8  # per CTA (4 or 8), the default inside CUDA-graph capture before a shape is timed
ROW_TILES = 1  # 16 weight rows each, per warp (1 or 2)
# What the first call of a shape outside capture times: (warps, row tiles) each with split-K 1-8
SHAPES = ((8, 1), (4, 1), (4, 2), (8, 2))
TOKENS_PER_CTA = 64  # at most; more tokens take more CTAs, each reading the weights again (from L2, mostly)


@functools.cache
def _entry(device_index: int):
    """The library's launch function, or None (logged once)."""
    if os.environ.get("FASTLLM_CUDA_KERNELS", "1") == "0":
        log.info("fastllm int4 MMA GEMM off (FASTLLM_CUDA_KERNELS=0)")
        return None
    major, minor = torch.cuda.get_device_capability(device_index)
    if major < 8:
        return None  # (bf16 mma)
    try:
        lib = ctypes.CDLL(str(cuda_gemv.build(f"{major}{minor}", sources=[SOURCE], name="w4mma")))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log.warning("fastllm int4 MMA GEMM not available, using the Triton GEMM: %s", e)
        return None
    fn = lib.fastllm_w4_mma
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 11 + [ctypes.c_size_t]
    return fn


_checked: dict[int, bool] = {}


def _first_product(device_index: int) -> bool:
    """A small product (two splits, odd sizes) against float64; False (logged) on any failure."""
    from ..stages.quantizers.int4 import dequantize_int4, pack_scales, quantize_int4

    dev = torch.device("cuda", device_index)
    g = torch.Generator(device="cpu").manual_seed(0)
    packed, scales, zeros = quantize_int4(torch.randn(40, 256, generator=g), GROUP)
    x = torch.randn(5, 256, generator=g).to(torch.bfloat16)
    ref = x.double() @ dequantize_int4(packed, scales, zeros, 256).double().T
    try:
        y = w4_mma(x.to(dev), packed.to(dev), pack_scales(scales, zeros).to(dev), GROUP, splits=2)
        torch.cuda.synchronize(dev)
    except RuntimeError as e:
        log.warning("fastllm int4 MMA GEMM failed its first product, using the Triton GEMM: %s", e)
        return False
    if not ((y.cpu().double() - ref).norm() / ref.norm()).item() <= 1e-2:  # (NaN fails too)
        log.warning("fastllm int4 MMA GEMM gave a wrong first product, using the Triton GEMM")
        return False
    return True


def available(x: torch.Tensor) -> bool:
    """Whether the kernel runs on x's device (built and checked on the first call outside capture)."""
    return cuda_gemv.checked_on_first_use(x, _checked, _entry, _first_product)


def fits(x: torch.Tensor, packed: torch.Tensor, pairs: torch.Tensor, group_size: int) -> bool:
    """Whether w4_mma takes these operands: x bf16 [M, K] with K % 8 == 0, rows 16-byte aligned;
    packed uint8 [N, Kp / 2] contiguous, Kp a multiple of 128 >= K, 16-byte aligned; pairs fp32
    [N, groups rounded up to even, 2] contiguous; groups of 128."""
    N, half = packed.shape
    Kp = 2 * half
    ng = Kp // GROUP
    return (group_size == GROUP and x.dim() == 2 and x.dtype == torch.bfloat16 and x.stride(1) == 1
            and x.shape[1] % 8 == 0 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0 and 0 < x.shape[1] <= Kp
            and Kp % GROUP == 0 and packed.dtype == torch.uint8 and packed.is_contiguous()
            and packed.data_ptr() % 16 == 0 and pairs.dtype == torch.float32 and pairs.is_contiguous()
            and pairs.shape == (N, ng + ng % 2, 2))


@functools.lru_cache(maxsize=None)
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_splits(M: int, N: int, Kp: int, sms: int, warps: int = WARPS, row_tiles: int = ROW_TILES) -> int:
    """Split-K: a power of two that brings the grid to about 16 warps per SM, each CTA keeping at
    least four groups."""
    ctas = -(-N // (16 * warps * row_tiles)) * -(-M // TOKENS_PER_CTA) * warps // 8
    split = 1
    while ctas * split * 2 <= 2 * sms and Kp // GROUP >= 8 * split and split < 16:
        split *= 2
    return split


_picks: dict[tuple, tuple[int, int, int]] = {}  # (device, tokens bucket, N, Kp) -> (warps, row tiles, splits)


def _pick(x: torch.Tensor, packed: torch.Tensor, pairs: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, int]:
    """The fastest (warps, row tiles, splits) for this shape, timed on its first call outside
    CUDA-graph capture (inside one, until then, WARPS and ROW_TILES with default_splits)."""
    M, N, Kp = x.shape[0], packed.shape[0], packed.shape[1] * 2
    key = (x.device, 1 << (M - 1).bit_length(), N, Kp)
    pick = _picks.get(key)
    if pick is None:
        if torch.cuda.is_current_stream_capturing():
            return WARPS, ROW_TILES, default_splits(M, N, Kp, _sms(cuda_gemv._index(x)))
        from .cutlass_gemm import _time

        # (in a CUDA graph: a product takes 10-40 us, about what launching it through ctypes costs)
        times = {(w, rt, s): _time(lambda: w4_mma(x, packed, pairs, GROUP, bias, s, w, rt), graph=True)
                 for w, rt in SHAPES for s in (1, 2, 4, 8) if s == 1 or Kp // GROUP >= 4 * s}
        pick = _picks[key] = min(times, key=times.get)
        log.debug("int4 MMA GEMM %s: %s", key, {c: round(t * 1e3, 1) for c, t in times.items()})
    return pick


def w4_mma(x: torch.Tensor, packed: torch.Tensor, pairs: torch.Tensor, group_size: int,
           bias: torch.Tensor | None = None, splits: int | None = None, warps: int | None = None,
           row_tiles: int | None = None) -> torch.Tensor:
    """y [M, N] bf16 = x @ w^T (+ bias), w = (q - zero) * scale per group, for the int4 layer's
    packed weight and its (scale, zero) pairs (fastllm.stages.quantizers.int4.pack_scales); see
    `fits`. Each weight is (q - zero) times the group's scale rounded to bf16, rounded to bf16 (as
    fastllm.kernels.cutlass_gemm's int4 GEMM forms it). splits: split-K; warps: per CTA, 4 or 8;
    row_tiles: 16 weight rows each, per warp (1 or 2). With none of the three given, the fastest for
    the shape (_pick); else WARPS, ROW_TILES and default_splits stand in for those not given."""
    if not fits(x, packed, pairs, group_size):
        raise ValueError(f"w4_mma takes bf16 x [M, K % 8 == 0] and int4 weights in groups of {GROUP}, got "
                         f"{x.dtype} {tuple(x.shape)}, {packed.dtype} {tuple(packed.shape)}, group {group_size}")
    fn = _entry(cuda_gemv._index(x))
    if fn is None:
        raise RuntimeError("the int4 MMA GEMM is not available on this machine (see the log)")
    from .qgemm import _counters

    M, K = x.shape
    N, Kp = packed.shape[0], packed.shape[1] * 2
    if splits is None and warps is None and row_tiles is None:
        warps, row_tiles, splits = _pick(x, packed, pairs, bias)
    warps, row_tiles = warps or WARPS, row_tiles or ROW_TILES
    splits = splits or default_splits(M, N, Kp, _sms(cuda_gemv._index(x)), warps, row_tiles)
    tokens = min(M, TOKENS_PER_CTA)
    y = torch.empty(M, N, dtype=torch.bfloat16, device=x.device)
    ws = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else y
    tiles = -(-N // (16 * warps * row_tiles)) * -(-M // tokens)
    cnt = _counters(x.device, tiles) if splits > 1 else y
    b = None if bias is None else bias.reshape(N).to(torch.bfloat16).contiguous()
    err = fn(packed.data_ptr(), pairs.data_ptr(), x.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
             ws.data_ptr(), cnt.data_ptr(), M, N, K, Kp, pairs.shape[1], x.stride(0), y.stride(0), tokens, warps, row_tiles,
             splits, torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"fastllm int4 MMA GEMM launch failed: {'operands refused' if err == -2 else err}")
    return y

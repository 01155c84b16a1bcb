"""The int8 weight-only product for a few tokens (2-64) on the tensor cores, in CUDA
(fastllm/kernels/cuda/gemm_few_int8.cu says how it computes), built with nvcc on first use into its
own shared library (fastllm.kernels.cuda_gemv.build: the same cache, compiler search and naming)
and called through ctypes. Where it cannot be built or loaded, or fails a first small product
against torch, `available` is False (the reason logged once).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess

import torch

from . import cuda_gemv as CG

log = logging.getLogger(__name__)
SOURCES = [CG.SOURCE_DIR / "gemm_few_int8.cu"]
MAX_TOKENS = 64
ROWS = 128  # weight rows per CTA (gemm_few_int8.cu's ROWS)
STEP = 64  # k per step
CTAS_PER_SM = 4  # split-K brings the grid to about this many CTAs per SM
_counters: dict = {}


@functools.cache
def _entry(device_index: int):
    """The library's launch function for this device, or None (logged once)."""
    if os.environ.get("FASTLLM_CUDA_KERNELS", "1") == "0":
        return None
    major, minor = CG._capability(device_index)
    if (major, minor) < (8, 0):  # bf16 mma
        log.info("fastllm few-token GEMM: compute capability %d.%d has no bf16 mma", major, minor)
        return None
    try:
        lib = ctypes.CDLL(str(CG.build(f"{major}{minor}", sources=SOURCES, name="few")))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log.warning("fastllm few-token GEMM not available: %s", e)
        return None
    fn = lib.fastllm_gemm_few_int8
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int] * 5 + [ctypes.c_size_t]
    return fn


_checked: dict[int, bool] = {}


def _first_product(device_index: int) -> bool:
    dev = torch.device("cuda", device_index)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randint(-128, 128, (40, 128), generator=g, dtype=torch.int8).to(dev)
    x = torch.randn(3, 128, generator=g).to(torch.bfloat16).to(dev)
    s = torch.rand(40, generator=g).to(dev) + 0.5
    try:
        y = gemm_few_int8(x, q, s)
        torch.cuda.synchronize(dev)
    except RuntimeError as e:
        log.warning("fastllm few-token GEMM failed its first product: %s", e)
        return False
    ref = (x.double() @ q.double().T) * s.double()
    if not ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2:
        log.warning("fastllm few-token GEMM gave a wrong first product")
        return False
    return True


def available(x: torch.Tensor) -> bool:
    """Whether gemm_few_int8 runs on x's device (built, and a first product checked, on the first
    call outside CUDA-graph capture)."""
    return CG.checked_on_first_use(x, _checked, _entry, _first_product)


def fits(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """bf16 x [M <= 64, K] with K % 64 == 0 and int8 [N, K] rows, contiguous, 16-byte aligned."""
    N, K = qweight.shape
    return (x.dim() == 2 and x.shape[1] == K and 0 < x.shape[0] <= MAX_TOKENS and x.dtype == torch.bfloat16
            and qweight.dtype == torch.int8 and K % STEP == 0 and qweight.is_contiguous()
            and qweight.data_ptr() % 16 == 0)


def _splits(blocks: int, M: int, K: int, sms: int) -> int:
    """CTAs per row block: enough for about CTAS_PER_SM per SM, each over at least four steps, and
    the fp32 partial sums (8 M bytes per row and split, written and read) at most K / 8 M."""
    return max(1, min(CTAS_PER_SM * sms // blocks, K // STEP // 4, K // (8 * M), 16))


def gemm_few_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                  splits: int | None = None) -> torch.Tensor:
    """y [M, N] bf16 = (x @ q^T) * scale (+ bias) for bf16 x [M <= 64, K]; see `fits`. splits: CTAs
    per 128 weight rows over K (default: _splits)."""
    if not fits(x, qweight):
        raise ValueError(f"gemm_few_int8 takes bf16 x [M <= {MAX_TOKENS}, K % {STEP} == 0] and contiguous int8 "
                         f"[N, K] weights, got {x.dtype} {tuple(x.shape)} and {qweight.dtype} {tuple(qweight.shape)}")
    fn = _entry(CG._index(x))
    if fn is None:
        raise RuntimeError("the few-token GEMM is not available on this machine (see the log)")
    M, K = x.shape
    N = qweight.shape[0]
    blocks = -(-N // ROWS)
    splits = _splits(blocks, M, K, CG._sms(CG._index(x))) if splits is None else splits
    steps = -(-(K // STEP) // splits)
    splits = -(-(K // STEP) // steps)  # none empty
    xv = x.contiguous() if x.data_ptr() % 16 == 0 else x.clone()
    s = scale.reshape(N).to(torch.float32).contiguous()
    b = None if bias is None else bias.reshape(N).to(torch.bfloat16).contiguous()
    y = torch.empty(M, N, dtype=torch.bfloat16, device=x.device)
    ws = torch.empty(splits, M, N, dtype=torch.float32, device=x.device) if splits > 1 else y
    key = (x.device, torch.cuda.current_stream(x.device).cuda_stream)
    cnt = _counters.get(key)
    if cnt is None or cnt.numel() < blocks:
        cnt = _counters[key] = torch.zeros(max(blocks, 4096), dtype=torch.int32, device=x.device)
    err = fn(qweight.data_ptr(), xv.data_ptr(), s.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
             ws.data_ptr(), cnt.data_ptr(), M, N, K, splits, steps, torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"fastllm few-token GEMM launch failed: cudaError {err}")
    return y

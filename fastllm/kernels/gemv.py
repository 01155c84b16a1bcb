"""Matrix-vector product for batch-1 decode (Triton): y[N] = W[N, K] @ x[K] (+ bias).

At one token a linear layer is a pure weight stream: each program reads BLOCK_N full rows of W
in BLOCK_K-wide tiles, multiplies by x in fp32 registers and reduces once at the end. N /
BLOCK_N programs, no split-K (which would need an fp32 buffer and a second kernel): small
BLOCK_N gives the grid enough programs to fill the card.

The input vector may be produced inside the kernel, saving the launch of the small op before
it (a few microseconds each, 64-96 per decode step): every program rebuilds x from L2
- `norm_weight`: x = RMSNorm(h [+ residual]); program 0 also writes h + residual. The sum of
  squares is gathered in the same pass as the product and 1/rms applied to each output, so the
  weights stream from the first cycle; the normalised x is kept in fp32 (the unfused kernels
  round it to the model dtype twice), so results agree with them to bf16 rounding, not bit for bit;
- `silu_mul`: x = silu(h[:K]) * h[K:] (the gate_up output feeding down_proj), rounded as
  fastllm.kernels.fused.silu_and_mul rounds it.

Row-scaled int8 / fp8 weights under 16-bit inputs go through `_gemv_bytes_kernel` (gemv_bytes), which reads
them as int32 words of four values and widens each in one instruction (see `_bytes_f32`): on an
H100 it made the int8 decode step 14% faster and fp8's 6% than this row kernel, in one call
(docs/quantization.md). int8 weights under bf16 inputs go to the CUDA GEMV
(fastllm.kernels.cuda_gemv) where nvcc can build it (`CUDA`), else to that kernel.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from triton.tools.tensor_descriptor import TensorDescriptor

from . import cuda_gemv
from .gemv_bytes import _gemv_bytes_kernel, _gemv_bytes_tma_kernel  # noqa: F401 (also used by scripts)
from .gemv_common import _input, _weight_f32  # noqa: F401 (qgemm imports _weight_f32 from here)
from .launch import autotune, launch_rows, pdl, tma_supported

CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
           for n, k, w, s in [(4, 512, 4, 4), (8, 256, 4, 4), (8, 512, 4, 3), (8, 512, 8, 4), (16, 256, 4, 4),
                              (16, 512, 8, 3), (4, 1024, 4, 3), (8, 1024, 8, 3), (2, 1024, 4, 4), (32, 256, 8, 3),
                              (1, 1024, 4, 4), (1, 2048, 4, 3), (2, 2048, 8, 3), (4, 2048, 8, 3), (2, 4096, 8, 2),
                              # wider 8-bit tiles; (16, 1024, 8) was the best int8 / fp8 word configuration for
                              # o_proj and down_proj in an H100 sweep (scripts/sweep_gemv.py, 2026-11-27)
                              (4, 4096, 8, 2), (8, 4096, 8, 2), (4, 4096, 4, 2), (8, 2048, 8, 3), (16, 1024, 8, 3)]]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, res_ptr, nw_ptr, res_out_ptr, scale_ptr, N, K, stride_w, eps,
                 HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, SILU_MUL: tl.constexpr,
                 HAS_SCALE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr, VIA_BITS: tl.constexpr = True):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    # The weights do not depend on the kernel before: the first tile is requested before waiting
    # for it (under PDL this program may start while that kernel's last programs still run), and
    # each later tile one iteration ahead of its use.
    cols = tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & (cols < K)[None, :], other=0.0,
                eviction_policy="evict_first")  # streamed once: keep L2 for x and the rest
    if USE_PDL:  # x comes from the kernel before (see fastllm.kernels.launch)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        nxt = cols + BLOCK_K
        w_next = tl.load(w_rows + nxt[None, :], mask=row_ok[:, None] & (nxt < K)[None, :], other=0.0,
                         eviction_policy="evict_first")
        x = _input(x_ptr, res_ptr, cols, col_ok, K, HAS_RES, SILU_MUL)
        if NORM:  # W (nw * x) now, times 1 / rms(x) at the end: one pass, weights stream from the start
            if HAS_RES:
                if pid == 0:
                    tl.store(res_out_ptr + cols, x.to(res_out_ptr.dtype.element_ty), mask=col_ok)
            ss += x * x
            x = x * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += _weight_f32(w, VIA_BITS) * x[None, :]
        w = w_next
    y = tl.sum(acc, axis=1)
    if NORM:
        y = y * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    if HAS_SCALE:  # weight-only quantized rows: W = q * scale[row]
        y = y * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


WORDS = True  # int8 / fp8 GEMVs through _gemv_bytes_kernel (see gemv's `words`)
# int8 GEMVs under bf16 inputs through the CUDA GEMV where it builds (see gemv's `cuda`)
CUDA = True
# The int8 linear layers take the RMSNorm before them into the CUDA GEMV (see cuda_norm). Off: no
# faster, the separate norm kernel hiding under the next GEMV's early weight loads. H100, Llama-2-7B
# int8 step, one call (scripts/quant_gpu.py "-cudanorm", 2026-11-28): 352.7 / 349.1 tok/s against
# 352.6 / 349.0 without.
CUDA_NORM = False
# fp8 (e4m3) GEMVs under bf16 inputs through the CUDA GEMV's fp8 form too. H100, Llama-2-7B fp8
# step, one call (scripts/quant_gpu.py "fp8-cuda8", 2026-11-28): 349.0 / 349.5 tok/s against 334.3
# for the Triton word GEMV (int8's CUDA GEMV: 350.3; bf16: 205.3).
CUDA_FP8 = True
# At one token, SiLU-and-mul in gate_up_proj's CUDA GEMV (gemv's `glu`: each warp sums a gate row
# and its up row), so down_proj's GEMV reads a plain input; without it down_proj's GEMV takes
# SiLU-and-mul in (its `silu_mul`) and each of its CTAs computes the whole activation. H200,
# Llama-2-7B int8 step, three calls (scripts/quant_gpu.py "-noglu", 2026-11-28): 442.1 tok/s mean
# of six runs against 436.9 of four without (+1.2%); fp8 the same with and without. With its whole
# batches on the plain path (nineteenth session, one call): 459.0 / 461.8 against 450.8 without GLU.
GLU = True
# The word kernel requests its inputs a tile ahead (see _gemv_bytes_kernel): off until measured
# on a GPU against the present kernel (scripts/sweep_gemv.py "-px" kinds, scripts/quant_gpu.py "-px").
PREFETCH_X = False
# Weight tiles the word kernel holds ahead of the one in use (1 or 2; _gemv_bytes_kernel's AHEAD):
# 2 not yet measured on a GPU (scripts/quant_gpu.py "-ahead2").
AHEAD = 1

def _tma_block(nargs: dict) -> None:
    """Autotuner pre-hook of the TMA kernel: the descriptor's block follows the configuration."""
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"] // 4]


# (BLOCK_N, BLOCK_K, num_warps, STAGES); the first H100 sweep (2026-11-27) had (8, 256-1024, 1-4, 3-5)
# best on the Llama-2-7B shapes
TMA_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "STAGES": st}, num_warps=w, num_stages=1, pre_hook=_tma_block)
               for n, k, w, st in [(4, 512, 1, 3), (8, 256, 1, 3), (8, 512, 2, 3), (8, 512, 2, 5), (8, 1024, 4, 3),
                                   (16, 256, 2, 3), (16, 512, 4, 3), (32, 256, 4, 3), (4, 1024, 2, 4),
                                   (16, 1024, 8, 3), (8, 256, 1, 5), (4, 256, 1, 4)]]
# On Hopper and later, int8 / fp8 GEMVs without a norm through the TMA kernel. Off: on an H100 it
# read 2-8% faster per layer (scripts/sweep_tma.py), yet the Llama-2-7B int8 step was slower with it
# in two calls (301.4 and 302.3 against 320.2 and 318.9 tok/s, 2026-11-27); not yet understood.
TMA = False
# The TMA kernel requests weight tiles before the PDL wait (HEAD_START, as gemv_int4.HEAD_START).
# H100, Llama-2-7B int8 step, one call (2026-11-27): TMA 310.9 tok/s with 1, 298.5 with 0; the word
# kernel 319.2, so TMA stays off. 2: not yet measured.
HEAD_START = 1
# The TMA kernel's best configuration per card and shape (N, K, fp8), from scripts/sweep_tma.py
# (chained under PDL, eight weight copies rotated, as a decode step runs them; H100, 2026-11-27):
# the autotuner, timing each configuration alone, picked ones up to 47% slower there (qkv int8:
# 28.0 against 19.1 us) and the int8 step fell to 1.51x bf16. (BLOCK_N, BLOCK_K, num_warps, STAGES)
PINNED_TMA = {("NVIDIA H100 80GB HBM3", 12288, 4096, False): (8, 256, 1, 3),
              ("NVIDIA H100 80GB HBM3", 4096, 4096, False): (4, 512, 1, 3),
              ("NVIDIA H100 80GB HBM3", 22016, 4096, False): (8, 1024, 4, 3),
              ("NVIDIA H100 80GB HBM3", 4096, 11008, False): (8, 512, 2, 5),
              ("NVIDIA H100 80GB HBM3", 12288, 4096, True): (8, 256, 1, 3),
              ("NVIDIA H100 80GB HBM3", 4096, 4096, True): (4, 512, 1, 3),
              ("NVIDIA H100 80GB HBM3", 22016, 4096, True): (4, 1024, 2, 4),
              ("NVIDIA H100 80GB HBM3", 4096, 11008, True): (8, 1024, 4, 3)}


@functools.lru_cache(maxsize=None)
def _pinned_tma(device: torch.device, N: int, K: int, fp8: bool) -> triton.Config | None:
    hit = PINNED_TMA.get((torch.cuda.get_device_name(device), N, K, fp8)) if device.type == "cuda" else None
    return None if hit is None else triton.Config({"BLOCK_N": hit[0], "BLOCK_K": hit[1], "STAGES": hit[3]},
                                                  num_warps=hit[2], num_stages=1)


_tuned = autotune(CONFIGS, key=["N", "K", "NORM", "SILU_MUL", "HAS_SCALE"])(_gemv_kernel)
INTERPRETED = type(_gemv_kernel).__name__ == "InterpretedFunction"  # Triton's CPU interpreter: no inline PTX
_tuned_bytes = autotune(CONFIGS, key=["N", "K", "NORM", "SILU_MUL", "FP8"])(_gemv_bytes_kernel)
_tuned_bytes_tma = autotune(TMA_CONFIGS, key=["N", "K", "SILU_MUL", "FP8"])(_gemv_bytes_tma_kernel)


def cuda_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether an int8 linear layer should take the RMSNorm before it into its GEMV of x: where the
    CUDA GEMV runs it (CUDA_NORM; the Triton GEMVs' fused norm is slower than a separate norm kernel,
    see fastllm.core.cuda_linear.DecodeLinear.fuse_norm)."""
    return (CUDA and CUDA_NORM and x.device.type == "cuda" and weight.dtype == torch.int8 and cuda_gemv.fits(x, weight)
            and cuda_gemv.available(x))


def glu_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemv(x, weight, scale=..., glu=True) runs: one bf16 input vector for an int8 (or,
    under CUDA_FP8, fp8) gate_up_proj weight, where the CUDA GEMV builds and GLU is on."""
    return (GLU and CUDA and x.device.type == "cuda" and (weight.dtype == torch.int8 or CUDA_FP8)
            and cuda_gemv.fits(x, weight, glu=True) and cuda_gemv.available(x))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
         norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
         silu_mul: bool = False, scale: torch.Tensor | None = None, config: triton.Config | None = None,
         words: bool | None = None, tma: bool | None = None, cuda: bool | None = None, glu: bool = False):
    """weight [N, K] (row-major) times one input vector x [1, K] or [K], plus bias [N]; the
    result has x's leading shape and dtype.

    norm_weight: multiply by RMSNorm(x + residual) (residual optional) instead of x; with a
    residual the result is (y, x + residual) and neither input is modified.
    silu_mul: x is [1, 2K]; multiply by silu(x[:K]) * x[K:].
    scale: [N] per-row scales of a weight-only quantized weight (int8 or fp8 [N, K]), applied to y.
    config pins a kernel configuration (benchmarks, tests); by default it is autotuned per shape.
    words: quantized weights under 16-bit inputs go through _gemv_bytes_kernel where K % 4 == 0
    (False: _gemv_kernel; default: the module's WORDS, which benchmarks switch to compare).
    tma: such a word GEMV without a norm through _gemv_bytes_tma_kernel (default: the module's TMA,
    on CUDA devices of compute capability 9.0 and later).
    cuda: an int8 weight under a bf16 input (and a bf16 norm weight, if any) through the CUDA GEMV
    (fastllm.kernels.cuda_gemv) where it can be built (default: the module's CUDA, unless config,
    words or tma asks for a Triton kernel); an fp8 one too when asked, or by default under CUDA_FP8.
    glu: weight is gate_up_proj's [2I, K] and the result silu(gate) * up [I] (see
    cuda_gemv.gemv_int8; the CUDA GEMV only: check `glu_fits` first).
    """
    N, K = weight.shape
    assert weight.stride(1) == 1 and x.numel() == (2 * K if silu_mul else K), (x.shape, weight.shape)
    assert not (silu_mul and norm_weight is not None)
    xv = x.reshape(-1).contiguous()
    has_res = residual is not None
    assert not has_res or norm_weight is not None, "a residual is only added before a norm"
    asked = cuda is not None
    if cuda is None:
        cuda = CUDA and config is None and words is None and tma is None
    if (cuda and scale is not None and x.device.type == "cuda" and (weight.dtype == torch.int8 or CUDA_FP8 or asked)
            and cuda_gemv.fits(x, weight, silu_mul, glu)
            and (norm_weight is None or norm_weight.dtype == torch.bfloat16) and cuda_gemv.available(x)):
        out = cuda_gemv.gemv_int8(xv, weight, scale, bias, silu_mul, use_pdl=pdl(x)["USE_PDL"],
                                  norm_weight=norm_weight, eps=eps, residual=residual, glu=glu)
        lead = x.shape[:-1]
        return (out[0].view(*lead, N), out[1].view(*lead, K)) if has_res else out.view(*lead, out.numel())
    if glu:
        raise ValueError("gemv: glu runs in the CUDA GEMV only (see glu_fits)")
    y = torch.empty(N, dtype=x.dtype, device=x.device)
    res = residual.reshape(K).contiguous() if has_res else xv
    res_out = torch.empty_like(res) if has_res else y
    args = (xv, weight, bias if bias is not None else y, y, res, norm_weight if norm_weight is not None else y,
            res_out, scale if scale is not None else y, N, K, weight.stride(0), eps)
    flags = dict(HAS_BIAS=bias is not None, HAS_RES=has_res, NORM=norm_weight is not None, SILU_MUL=silu_mul, **pdl(x))
    # the word kernel's int8 offset costs 8 of fp32's 24 bits: far below a bf16 / fp16 output's
    # rounding, not below an fp32 one's
    if words is None:
        words = WORDS
    if (scale is not None and words and x.dtype != torch.float32 and K % 4 == 0 and weight.stride(0) % 4 == 0
            and weight.data_ptr() % 16 == 0):
        words = weight.view(torch.int32)
        flags |= dict(FP8=weight.dtype != torch.int8, ASM=not INTERPRETED)
        if tma is None:  # (a pinned configuration of the other kernel has no STAGES)
            tma = TMA and tma_supported(x) and (config is None or "STAGES" in config.kwargs)
        if tma and norm_weight is None and weight.stride(0) % 16 == 0:
            desc = TensorDescriptor.from_tensor(words, [1, 4])  # block: set per configuration
            config = config or _pinned_tma(x.device, N, K, weight.dtype != torch.int8)
            if config is not None:
                _tma_block(dict(w_desc=desc, **config.kwargs))
            flags.pop("HAS_RES"), flags.pop("NORM")
            flags["HEAD_START"] = HEAD_START
            launch_rows(_tuned_bytes_tma, _gemv_bytes_tma_kernel, N, args[:1] + (desc,) + args[2:4] + args[7:9] + (K,),
                        flags, config)
        else:
            args = args[:1] + (words,) + args[2:10] + (words.stride(0), eps)
            if config is not None and "STAGES" in config.kwargs:  # a TMA configuration where TMA cannot run: its tile
                config = triton.Config({"BLOCK_N": config.kwargs["BLOCK_N"], "BLOCK_K": config.kwargs["BLOCK_K"]},
                                       num_warps=config.num_warps, num_stages=1)
            launch_rows(_tuned_bytes, _gemv_bytes_kernel, N, args, flags | dict(PREFETCH_X=PREFETCH_X, AHEAD=AHEAD), config)
    else:
        launch_rows(_tuned, _gemv_kernel, N, args, flags | dict(HAS_SCALE=scale is not None), config)
    lead = x.shape[:-1]
    y = y.view(*lead, N)
    return (y, res_out.view(*lead, K)) if has_res else y

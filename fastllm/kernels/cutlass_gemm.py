"""Weight-only int8 and int4 matrix products of many tokens on Hopper: CUTLASS's mixed-input GEMM
(cuda/gemm_w8a16.cu and cuda/gemm_w4a16.cu say how they compute), y = x @ dequant(W)^T with x, y
bf16.

It needs compute capability 9.0, nvcc and CUTLASS's headers: the `nvidia-cutlass` package
(`pip install fastllm[cutlass]`), or a CUTLASS source tree named by CUTLASS_PATH. The library is
built on first use into the kernel cache, as fastllm.kernels.cuda_gemv builds its GEMVs (a few
minutes, once per card and nvcc), and checked against torch on a first small product. Where
anything is missing, or FASTLLM_CUDA_KERNELS=0 is set, `available` is False (the reason logged
once) and the layers keep their Triton GEMM.

Each call takes the fastest of the library's tiles, Triton's GEMM (fastllm.kernels.qgemm) and
dequantize-then-cuBLAS, timed once per (format, tokens rounded up to a power of two, N, K) on the
first call outside CUDA-graph capture (inside one, an untimed shape takes TILE_DEFAULT).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import logging
import os
import re
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from . import cuda_gemv

log = logging.getLogger(__name__)
SOURCES = [cuda_gemv.SOURCE_DIR / "gemm_w8a16.cu", cuda_gemv.SOURCE_DIR / "gemm_w4a16.cu"]
TILE_DEFAULT = 1  # (128 weight rows, 256 tokens), the fastest alone from 1,024 tokens on an H100
TRITON, DENSE = -1, -2  # the other candidates of the timing
# Triton's GEMM is timed up to this many tokens (int8; above, it ran at 0.80-0.88x cuBLAS' bf16 on an
# H100, never the fastest), and up to TRITON_MAX_TOKENS_INT4 for int4 (its layers switch to
# dequantize-then-cuBLAS from 256)
TRITON_MAX_TOKENS, TRITON_MAX_TOKENS_INT4 = 2048, 256


def cutlass_include() -> list[Path] | None:
    """CUTLASS's include directories (CUTLASS_PATH, else the nvidia-cutlass package's), or None."""
    root = os.environ.get("CUTLASS_PATH")
    if root is None:
        spec = importlib.util.find_spec("cutlass_library")
        if spec is None or not spec.submodule_search_locations:
            return None
        root = Path(spec.submodule_search_locations[0]) / "source"
    dirs = [Path(root) / "include", Path(root) / "tools" / "util" / "include"]
    return dirs if all((d / "cutlass").is_dir() for d in dirs) else None


def build(cache_dir: Path | None = None) -> Path:
    """The library for sm_90a, compiled into the kernel cache unless it is there. Raises
    RuntimeError (no CUTLASS headers, no nvcc, or nvcc's errors)."""
    include = cutlass_include()
    if include is None:
        raise RuntimeError("no CUTLASS headers (pip install nvidia-cutlass, or set CUTLASS_PATH)")
    flags = ("-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG", *(f"-I{d}" for d in include))
    version = re.findall(r"#define CUTLASS_(?:MAJOR|MINOR|PATCH) (\d+)", (include[0] / "cutlass" / "version.h").read_text())
    return cuda_gemv.build("90a", cache_dir, sources=SOURCES, name=f"cutlass{'.'.join(version)}-gemm", flags=flags)


@functools.cache
def _entry(device_index: int):
    """The library's int8 launch function (its tile count as `.configs`; the int4 one as `.int4`,
    with its own `.configs`), or None (logged once)."""
    if os.environ.get("FASTLLM_CUDA_KERNELS", "1") == "0":
        log.info("fastllm CUTLASS GEMM off (FASTLLM_CUDA_KERNELS=0)")
        return None
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return None  # (wgmma and its TMA pipeline: Hopper's own instructions)
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log.warning("fastllm CUTLASS GEMM not available, using the Triton GEMM: %s", e)
        return None
    fn = lib.fastllm_w8a16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [ctypes.c_size_t]
    fn.configs = lib.fastllm_w8a16_configs()
    fn.int4 = lib.fastllm_w4a16
    fn.int4.restype = ctypes.c_int
    fn.int4.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5 + [ctypes.c_size_t]
    fn.int4.configs = lib.fastllm_w4a16_configs()
    return fn


_checked: dict[int, bool] = {}  # device index -> the library built, loaded and passed its first product
_index = cuda_gemv._index


def _first_product(device_index: int) -> bool:
    """A small int8 and int4 product through the library against float64; False (logged) on any
    failure."""
    from ..stages.quantizers.int4 import dequantize_int4, quantize_int4

    dev = torch.device("cuda", device_index)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randint(-127, 128, (24, 128), generator=g, dtype=torch.int8).to(dev)
    x = torch.randn(5, 128, generator=g).to(torch.bfloat16).to(dev)
    s = (torch.rand(24, generator=g) + 0.5).to(dev)
    packed, scales, zeros = quantize_int4(torch.randn(24, 128, generator=g), 64)
    packed, scales, zeros = packed.to(dev), scales.to(dev), zeros.to(dev)
    try:
        y8 = _int8(x, q, s, TILE_DEFAULT)
        y4 = _int4(x, packed, scales, zeros, 64, int4_operands(scales, zeros), TILE_DEFAULT)
        torch.cuda.synchronize(dev)
    except RuntimeError as e:
        log.warning("fastllm CUTLASS GEMM failed its first product, using the Triton GEMM: %s", e)
        return False
    w4 = dequantize_int4(packed, scales, zeros, 128).double()
    for y, ref in ((y8, (x.double() @ q.double().T) * s.double()), (y4, x.double() @ w4.T)):
        if not ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2:  # (NaN fails too)
            log.warning("fastllm CUTLASS GEMM gave a wrong first product, using the Triton GEMM")
            return False
    return True


def available(x: torch.Tensor) -> bool:
    """Whether the library runs on x's device (built and checked on the first call outside
    CUDA-graph capture)."""
    return cuda_gemv.checked_on_first_use(x, _checked, _entry, _first_product)


def fits(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether the GEMM takes these operands: x bf16 [M, K] and q int8 [N, K], both packed rows on
    16-byte boundaries (TMA), K % 16 == 0 and N % 8 == 0 (y's rows, 16 bytes)."""
    N, K = qweight.shape
    return (x.dtype == torch.bfloat16 and qweight.dtype == torch.int8 and x.dim() == 2 and x.shape[1] == K
            and K % 16 == 0 and N % 8 == 0 and x.is_contiguous() and qweight.is_contiguous()
            and x.data_ptr() % 16 == 0 and qweight.data_ptr() % 16 == 0)


def fits_int4(x: torch.Tensor, packed: torch.Tensor, group_size: int) -> bool:
    """Whether the int4 GEMM takes these operands: x bf16 [M, K] packed on a 16-byte boundary, the
    weight packed [N, K / 2] likewise (K itself a multiple of the group, no padding), groups a
    multiple of 64 (the GEMM's K step), N % 8 == 0."""
    N, K = packed.shape[0], packed.shape[1] * 2
    return (x.dtype == torch.bfloat16 and packed.dtype == torch.uint8 and x.dim() == 2 and x.shape[1] == K
            and group_size % 64 == 0 and K % group_size == 0 and N % 8 == 0 and x.is_contiguous()
            and packed.is_contiguous() and x.data_ptr() % 16 == 0 and packed.data_ptr() % 16 == 0)


def int4_operands(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 GEMM's group operands from fp32 scales and zeros [N, groups]: bf16 scales and
    -zero * scale, both [groups, N] (the GEMM forms scale * q + that in registers)."""
    return (scales.t().to(torch.bfloat16).contiguous(), (-zeros * scales).t().to(torch.bfloat16).contiguous())


def _check(rc: int, what: str, tile: int, x: torch.Tensor, w: torch.Tensor) -> None:
    if rc:
        raise RuntimeError(f"fastllm CUTLASS {what} GEMM, tile {tile}, {tuple(x.shape)} x {tuple(w.shape)}: "
                           + ("shape refused" if rc == -2 else f"error {rc}"))


def _out(x: torch.Tensor, N: int) -> torch.Tensor:
    return torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)


def _int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, c: int) -> torch.Tensor:
    if c == TRITON:
        from .qgemm import qgemm_rows

        return qgemm_rows(x, qweight, scale)
    if c == DENSE:
        from .dequant import dequantize_rows

        return F.linear(x, dequantize_rows(qweight, scale, x.dtype))
    y = _out(x, qweight.shape[0])
    rc = _entry(_index(x))(qweight.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), x.shape[0],
                           qweight.shape[0], x.shape[1], c, torch.cuda.current_stream(x.device).cuda_stream)
    _check(rc, "int8", c, x, qweight)
    return y


def _int4(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
          operands: tuple[torch.Tensor, torch.Tensor], c: int) -> torch.Tensor:
    if c == TRITON:
        from .qgemm import qgemm_int4

        return qgemm_int4(x, packed, scales, zeros, group_size)
    if c == DENSE:
        from .dequant import dequantize_int4

        return F.linear(x, dequantize_int4(packed, scales, zeros, group_size, x.shape[1], x.dtype))
    y = _out(x, packed.shape[0])
    rc = _entry(_index(x)).int4(packed.data_ptr(), operands[0].data_ptr(), operands[1].data_ptr(), x.data_ptr(),
                                y.data_ptr(), x.shape[0], packed.shape[0], x.shape[1], group_size, c,
                                torch.cuda.current_stream(x.device).cuda_stream)
    _check(rc, "int4", c, x, packed)
    return y


_picks: dict[tuple, int] = {}  # (format, device, tokens bucket, N, K) -> the fastest candidate


# Time the candidates as `reps` products captured in one CUDA graph, as decode steps run, so host
# time (ctypes, CUTLASS's argument set-up, Triton's launcher) counts for none of them; eager
# timing adds it to each, and at 128-256 tokens a layer's product takes 10-50 us. Off: not yet
# measured on a GPU (scripts/cutlass_gemm_gpu.py --graph-timing).
GRAPH_TIMING = False


def _time(fn, reps: int = 10, graph: bool | None = None) -> float:
    """Milliseconds per fn() call (graph: captured in one CUDA graph; GRAPH_TIMING when None)."""
    fn()  # (Triton's GEMM tunes itself here)
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if GRAPH_TIMING if graph is None else graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for _ in range(reps):
                fn()
        captured.replay()
        start.record()
        captured.replay()
        end.record()
    else:
        start.record()
        for _ in range(reps):
            fn()
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _pick(key: tuple, run, candidates: list[int]) -> int:
    """The fastest of `candidates` (run(c) computes the product with candidate c) for this key,
    timed on its first call outside capture."""
    pick = _picks.get(key)
    if pick is None:
        if torch.cuda.is_current_stream_capturing():
            return TILE_DEFAULT
        times = {}
        for c in candidates:
            try:
                times[c] = _time(lambda: run(c))
            except RuntimeError:  # (a tile CUTLASS refuses for this shape)
                continue
        pick = _picks[key] = min(times, key=times.get)
        log.debug("CUTLASS GEMM %s: %s", key, {c: round(t * 1e3, 1) for c, t in times.items()})
    return pick


def _bucket(x: torch.Tensor) -> int:
    return 1 << (x.shape[0] - 1).bit_length()


def w8a16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y [M, N] = (x @ q^T) * scale[n] rounded to bf16 once, through the fastest candidate for this
    shape (see the module's docstring); `fits` and `available` must hold."""
    key = ("int8", x.device, _bucket(x), *qweight.shape)
    triton = [TRITON] if x.shape[0] <= TRITON_MAX_TOKENS else []
    c = _pick(key, lambda c: _int8(x, qweight, scale, c), [*triton, DENSE, *range(_entry(_index(x)).configs)])
    return _int8(x, qweight, scale, c)


def w4a16(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
          operands: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """y [M, N] = x @ w^T, w = (q - zero) * scale per group of fastllm.stages.quantizers.int4's
    storage (operands: int4_operands(scales, zeros), kept by the caller), through the fastest
    candidate for this shape; `fits_int4` and `available` must hold."""
    key = ("int4", x.device, _bucket(x), packed.shape[0], x.shape[1], group_size)
    triton = [TRITON] if x.shape[0] <= TRITON_MAX_TOKENS_INT4 else []
    c = _pick(key, lambda c: _int4(x, packed, scales, zeros, group_size, operands, c),
              [*triton, DENSE, *range(_entry(_index(x)).int4.configs)])
    return _int4(x, packed, scales, zeros, group_size, operands, c)

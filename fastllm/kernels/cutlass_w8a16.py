"""Weight-only int8 matrix products of many tokens on Hopper: CUTLASS's mixed-input GEMM
(cuda/gemm_w8a16.cu says how it computes), y = (x @ q^T) * scale with x, y bf16.

It needs compute capability 9.0, nvcc and CUTLASS's headers: the `nvidia-cutlass` package
(`pip install fastllm[cutlass]`), or a CUTLASS source tree named by CUTLASS_PATH. The library is
built on first use into the kernel cache, as fastllm.kernels.cuda_gemv builds its GEMVs (a few
minutes, once per card and nvcc), and checked against torch on a first small product. Where
anything is missing, or FASTLLM_CUDA_KERNELS=0 is set, `available` is False (the reason logged
once) and Int8Linear keeps its Triton GEMM.

Each call takes the fastest of the library's tiles, Triton's GEMM (fastllm.kernels.qgemm) and
dequantize-then-cuBLAS, timed once per (tokens rounded up to a power of two, N, K) on the first
call outside CUDA-graph capture (inside one, an untimed shape takes TILE_DEFAULT).
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
SOURCE = cuda_gemv.SOURCE_DIR / "gemm_w8a16.cu"
TILE_DEFAULT = 1  # (128 weight rows, 256 tokens), the fastest alone from 1,024 tokens on an H100
TRITON, DENSE = -1, -2  # the other candidates of the timing
TRITON_MAX_TOKENS = 2048  # (above, Triton's GEMM ran at 0.80-0.88x cuBLAS' bf16, never the fastest)


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
    return cuda_gemv.build("90a", cache_dir, sources=[SOURCE], name=f"w8a16-cutlass{'.'.join(version)}", flags=flags)


@functools.cache
def _entry(device_index: int):
    """The library's launch function (its tile count as `.configs`), or None (logged once)."""
    if os.environ.get("FASTLLM_CUDA_KERNELS", "1") == "0":
        log.info("fastllm CUTLASS GEMM off (FASTLLM_CUDA_KERNELS=0)")
        return None
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return None  # (wgmma and its TMA pipeline: Hopper's own instructions)
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log.warning("fastllm CUTLASS int8 GEMM not available, using the Triton GEMM: %s", e)
        return None
    fn = lib.fastllm_w8a16
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [ctypes.c_size_t]
    fn.configs = lib.fastllm_w8a16_configs()
    return fn


_checked: dict[int, bool] = {}  # device index -> the library built, loaded and passed its first product
_index = cuda_gemv._index


def _first_product(device_index: int) -> bool:
    dev = torch.device("cuda", device_index)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8).to(dev)
    x = torch.randn(5, 64, generator=g).to(torch.bfloat16).to(dev)
    s = (torch.rand(24, generator=g) + 0.5).to(dev)
    try:
        y = _run(x, q, s, TILE_DEFAULT)
        torch.cuda.synchronize(dev)
    except RuntimeError as e:
        log.warning("fastllm CUTLASS int8 GEMM failed its first product, using the Triton GEMM: %s", e)
        return False
    ref = (x.double() @ q.double().T) * s.double()
    if not ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2:  # (NaN fails too)
        log.warning("fastllm CUTLASS int8 GEMM gave a wrong first product, using the Triton GEMM")
        return False
    return True


def available(x: torch.Tensor) -> bool:
    """Whether the library runs on x's device (built and checked on the first call outside
    CUDA-graph capture)."""
    if x.device.type != "cuda":
        return False
    i = _index(x)
    if i not in _checked:
        if torch.cuda.is_current_stream_capturing():
            return False
        _checked[i] = _entry(i) is not None and _first_product(i)
    return _checked[i]


def fits(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether the GEMM takes these operands: x bf16 [M, K] and q int8 [N, K], both packed rows on
    16-byte boundaries (TMA), K % 16 == 0 and N % 8 == 0 (y's rows, 16 bytes)."""
    N, K = qweight.shape
    return (x.dtype == torch.bfloat16 and qweight.dtype == torch.int8 and x.dim() == 2 and x.shape[1] == K
            and K % 16 == 0 and N % 8 == 0 and x.is_contiguous() and qweight.is_contiguous()
            and x.data_ptr() % 16 == 0 and qweight.data_ptr() % 16 == 0)


def _run(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, config: int,
         out: torch.Tensor | None = None) -> torch.Tensor:
    if config == TRITON:
        from .qgemm import qgemm_rows

        return qgemm_rows(x, qweight, scale)
    if config == DENSE:
        from .dequant import dequantize_rows

        return F.linear(x, dequantize_rows(qweight, scale, x.dtype))
    y = torch.empty(x.shape[0], qweight.shape[0], dtype=x.dtype, device=x.device) if out is None else out
    fn = _entry(_index(x))
    rc = fn(qweight.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), x.shape[0], qweight.shape[0],
            x.shape[1], config, torch.cuda.current_stream(x.device).cuda_stream)
    if rc:
        raise RuntimeError(f"fastllm CUTLASS int8 GEMM, tile {config}, {tuple(x.shape)} x {tuple(qweight.shape)}: "
                           + ("shape refused" if rc == -2 else f"error {rc}"))
    return y


_picks: dict[tuple, int] = {}  # (device, tokens bucket, N, K) -> the fastest candidate


def _time(fn, reps: int = 10) -> float:
    fn()  # (Triton's GEMM tunes itself here)
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def _pick(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> int:
    M = x.shape[0]
    key = (x.device, 1 << (M - 1).bit_length(), *qweight.shape)
    pick = _picks.get(key)
    if pick is None:
        if torch.cuda.is_current_stream_capturing():
            return TILE_DEFAULT
        times = {}
        triton = [TRITON] if M <= TRITON_MAX_TOKENS else []
        for c in [*triton, DENSE, *range(_entry(_index(x)).configs)]:
            try:
                times[c] = _time(lambda: _run(x, qweight, scale, c))
            except RuntimeError:  # (a tile CUTLASS refuses for this shape)
                continue
        pick = _picks[key] = min(times, key=times.get)
        log.debug("int8 GEMM %s: %s", key[1:], {c: round(t * 1e3, 1) for c, t in times.items()})
    return pick


def w8a16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y [M, N] = (x @ q^T) * scale[n] rounded to bf16 once, through the fastest candidate for this
    shape (see the module's docstring); `fits` and `available` must hold."""
    return _run(x, qweight, scale, _pick(x, qweight, scale))

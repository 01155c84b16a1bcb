"""fastllm's CUDA GEMVs (fastllm/kernels/cuda/: gemv_int8.cu says why, and how they compute; gemv_int4.cu
is the same structure for int4 weights), built with nvcc on first use into one shared library and
called through ctypes.

The library is compiled for the card's architecture into the cache (FASTLLM_CACHE, else
$XDG_CACHE_HOME/fastllm, else ~/.cache/fastllm, under cuda/), named by the source's hash, the
architecture and nvcc's version, so a later process loads it without compiling. nvcc is looked for
in CUDA_HOME, CUDA_PATH, /usr/local/cuda and the PATH. Where there is none, or it fails, or the
card is older than compute capability 6.1, or the built library fails a first small product
against torch (a driver older than the nvcc, say), or FASTLLM_CUDA_KERNELS=0 is set, `available`
is False (the reason logged once) and fastllm.kernels.gemv keeps its Triton kernels. That first product runs outside CUDA-graph
capture: until it has run, a capturing stream gets the Triton kernels.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE_DIR = Path(__file__).with_name("cuda")
SOURCES = [SOURCE_DIR / "gemv_int8.cu", SOURCE_DIR / "gemv_int4.cu"]
# Warps (one row each) per CTA: 8 or 16 (benchmarks switch it). Llama-2-7B int8, batch 1, H100, one
# call (2026-11-28): 16 rows 329.9 tok/s, 8 rows 327.5, the Triton word GEMV 325.1.
WARPS = 16
# CTAs per SM of a persistent int8 GEMV grid (0: one row per warp, a CTA per WARPS rows): each warp
# then streams every (CTAs x WARPS)-th row, requesting the next row's first weights before it uses
# the current row's last. Off: no faster. H100, one call (2026-11-28): the Llama-2-7B layer chain
# (scripts/chain_gpu.py --launched) 72.0 us per layer with 2 CTAs per SM against 70.8; the int8 step
# (scripts/quant_gpu.py -persist2) 346.5 / 348.3 tok/s against 350.1 / 349.8.
PERSIST = 0
# The int4 GEMV: registers capped for INT4_MINB CTAs per SM (1: uncapped, 90 registers; 2 with 16
# rows per CTA, 3 with 8), and PERSIST4 CTAs per SM of a persistent grid (0: a CTA per WARPS rows).
# With both (2, 2) its chain ran 53.2 us per layer against 76.1 uncapped and 67.4 for the Triton
# int4 GEMV, yet the step stayed slower than the Triton TMA GEMV's (407.8 against 452.8 tok/s; the
# eager step's GEMVs 2,094 us against 1,876): fastllm.kernels.gemv_int4.CUDA stays off (H100, 2026-11-28).
INT4_MINB = 1
PERSIST4 = 0
_build_lock = threading.Lock()


def nvcc() -> str | None:
    """The nvcc to build with, or None."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def build(arch: str, cache_dir: Path | None = None, sources: list[Path] | None = None, name: str = "gemv",
          flags: tuple[str, ...] = ()) -> Path:
    """The shared library of `sources` (SOURCES: the GEMVs) for compute capability `arch` ("90" for
    9.0, "90a" for Hopper's own instructions), compiled with extra nvcc `flags` into cache_dir/cuda
    unless it is there already (named by `name` and a hash of the sources, the shared headers, the
    flags other than include directories, and nvcc's version). Raises RuntimeError (no nvcc, or its
    error output)."""
    from ..stages.loaders.gguf import default_cache_dir

    sources = SOURCES if sources is None else sources
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("no nvcc found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, PATH)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    text = b"".join(p.read_bytes() for p in [*sources, *sorted(SOURCE_DIR.glob("*.cuh"))])
    named = " ".join(f for f in flags if not f.startswith("-I"))  # (not where the headers happen to lie)
    key = hashlib.sha256(text + arch.encode() + version.encode() + named.encode()).hexdigest()[:16]
    out = (cache_dir or default_cache_dir()) / "cuda"
    lib = out / f"{name}-sm{arch}-{key}.so"
    with _build_lock:
        if not lib.is_file():
            log.info("building fastllm's %s kernels for sm_%s with %s (once per card and nvcc)", name, arch, compiler)
            out.mkdir(parents=True, exist_ok=True)
            tmp = lib.with_name(f"{lib.name}.{os.getpid()}.tmp")
            objs = [tmp.with_name(f"{tmp.name}.{src.stem}.o") for src in sources]
            flags = ["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xcompiler", "-fPIC", *flags]
            procs = [subprocess.Popen([compiler, *flags, "-c", str(src), "-o", str(obj)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for src, obj in zip(sources, objs)]
            try:  # each source compiled in its own process (they take about as long), then linked
                errors = []
                for pr in procs:
                    err = pr.communicate(timeout=600)[1]
                    errors.append(err or f"nvcc exited with {pr.returncode}" if pr.returncode else "")
                if not any(errors):
                    link = subprocess.run([compiler, *flags, "-shared", "-o", str(tmp), *map(str, objs)],
                                          capture_output=True, text=True, timeout=600)
                    errors.append(link.stderr or "link failed" if link.returncode else "")
            finally:
                for pr in procs:
                    if pr.poll() is None:
                        pr.kill()
                        pr.wait()
                for obj in objs:
                    obj.unlink(missing_ok=True)
            if any(errors):
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"nvcc failed on {', '.join(p.name for p in sources)}:\n{''.join(errors)[-2000:]}")
            os.replace(tmp, lib)  # atomic: another process sees the whole file or none
    return lib


@functools.cache
def _entry(device_index: int):
    """The library's int8 launch function for this device (its int4 one as `.int4`), or None
    (logged once)."""
    if os.environ.get("FASTLLM_CUDA_KERNELS", "1") == "0":
        log.info("fastllm CUDA GEMV off (FASTLLM_CUDA_KERNELS=0); Triton kernels only")
        return None
    major, minor = _capability(device_index)
    if (major, minor) < (6, 1):  # dp4a
        log.info("fastllm CUDA GEMV: compute capability %d.%d has no dp4a; Triton kernels only", major, minor)
        return None
    try:
        lib = ctypes.CDLL(str(build(f"{major}{minor}")))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        log.warning("fastllm CUDA GEMV not available, using the Triton kernels: %s", e)
        return None
    fn = lib.fastllm_gemv_int8
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] * 5 + [ctypes.c_int] * 6 + [ctypes.c_void_p] * 3 + [ctypes.c_float]
                   + [ctypes.c_size_t])
    fn8 = lib.fastllm_gemv_fp8
    fn8.restype, fn8.argtypes = fn.restype, fn.argtypes
    fn.fp8 = fn8
    fn4 = lib.fastllm_gemv_int4
    fn4.restype = ctypes.c_int
    fn4.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 10 + [ctypes.c_size_t]
    fn.int4 = fn4
    return fn


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def _sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


_checked: dict[int, bool] = {}  # device index -> the library built, loaded and passed its first product


def _first_product(device_index: int) -> bool:
    """A small product through the library against torch's; False (logged) on any failure."""
    dev = torch.device("cuda", device_index)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8).to(dev)
    x = torch.randn(64, generator=g).to(torch.bfloat16).to(dev)
    s = torch.rand(24, generator=g).to(dev) + 0.5
    try:
        y = gemv_int8(x, q, s)
        torch.cuda.synchronize(dev)
    except RuntimeError as e:
        log.warning("fastllm CUDA GEMV failed its first product, using the Triton kernels: %s", e)
        return False
    ref = (q.double() @ x.double()) * s.double()
    if not ((y.double() - ref).norm() / ref.norm()).item() <= 1e-2:  # (NaN fails too)
        log.warning("fastllm CUDA GEMV gave a wrong first product, using the Triton kernels")
        return False
    return True


def checked_on_first_use(x: torch.Tensor, checked: dict[int, bool], entry, first_product) -> bool:
    """Whether a built library runs on x's device: on the first call outside CUDA-graph capture,
    entry(index) (building and loading it, None on failure) and first_product(index) decide, and
    `checked` keeps the answer per device; inside a capture, until then, False."""
    if x.device.type != "cuda":
        return False
    i = _index(x)
    if i not in checked:
        if torch.cuda.is_current_stream_capturing():
            return False
        checked[i] = entry(i) is not None and first_product(i)
    return checked[i]


def available(x: torch.Tensor) -> bool:
    """Whether the CUDA GEMV runs on x's device (building it, and checking a first product, on the
    first call outside CUDA-graph capture)."""
    return checked_on_first_use(x, _checked, _entry, _first_product)


def fits(x: torch.Tensor, qweight: torch.Tensor, silu_mul: bool = False, glu: bool = False) -> bool:
    """Whether gemv_int8 takes these operands: bf16 x, int8 (or float8 e4m3, on CUDA devices of compute
    capability 8.9+) [N, K] rows with K % 16 == 0, 16-byte aligned (with glu, N even)."""
    N, K = qweight.shape
    fp8_ok = qweight.dtype == torch.float8_e4m3fn and (not qweight.is_cuda or _capability(_index(qweight)) >= (8, 9))
    return (x.dtype == torch.bfloat16 and (qweight.dtype == torch.int8 or fp8_ok) and K % 16 == 0
            and (not glu or N % 2 == 0 and not silu_mul) and qweight.stride(1) == 1
            and qweight.stride(0) == K and qweight.data_ptr() % 16 == 0 and x.numel() == (2 * K if silu_mul else K))


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t flat and contiguous, on a 16-byte boundary (the kernel reads 16 bytes at a time)."""
    t = t.reshape(-1).contiguous()
    return t.clone() if t.data_ptr() % 16 else t


def gemv_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              silu_mul: bool = False, use_pdl: bool = False, norm_weight: torch.Tensor | None = None,
              eps: float = 1e-6, residual: torch.Tensor | None = None, glu: bool = False):
    """y [N] bf16 = (q @ x) * scale (+ bias) for one input vector x (bf16 [K], or with silu_mul [2K]:
    x = silu(x[:K]) * x[K:]); see `fits` for the operands it takes. glu: q is gate_up_proj's [2I, K]
    (gate rows, then up rows) and y [I] = silu(gate) * up of its bf16 outputs, rounded as that layer
    and fastllm.kernels.fused.silu_and_mul round them. use_pdl: launched as a
    programmatic dependent of the kernel before (fastllm.kernels.launch). float8 e4m3 weights go
    through gemv_int8.cu's fp8 form (products summed in f16 pairs per chunk of 16, 16 rows per CTA).

    norm_weight: multiply by RMSNorm(x) * norm_weight instead, rounded as fastllm.kernels.fused.rms_norm
    rounds it; with a residual, RMSNorm(x + residual) and the result is (y, x + residual) (a new
    tensor; neither input is modified), as fastllm.kernels.gemv.gemv's."""
    N, K = qweight.shape
    if not fits(x, qweight, silu_mul, glu):
        raise ValueError(f"gemv_int8 takes bf16 x and int8 or float8 e4m3 (compute capability 8.9+) [N, K % 16 == 0] "
                         f"weights, got {x.dtype} {tuple(x.shape)} "
                         f"and {qweight.dtype} {tuple(qweight.shape)}")
    if (silu_mul or glu) and norm_weight is not None or residual is not None and norm_weight is None:
        raise ValueError("gemv_int8: a norm takes no silu_mul or glu, and a residual comes only with a norm")
    for name, t in (("norm_weight", norm_weight), ("residual", residual)):
        if t is not None and (t.dtype != torch.bfloat16 or t.numel() != K or t.device != x.device):
            raise ValueError(f"gemv_int8: {name} must be bf16 [{K}] on {x.device}, got {t.dtype} {tuple(t.shape)}")
    fn = _entry(_index(x))
    if fn is None:
        raise RuntimeError("the CUDA GEMV is not available on this machine (see the log)")
    xv = _aligned(x)
    s = scale.reshape(N).to(torch.float32).contiguous()
    b = None if bias is None else bias.reshape(N).to(torch.bfloat16).contiguous()
    rows = N // 2 if glu else N  # (outputs)
    y = torch.empty(rows, dtype=torch.bfloat16, device=x.device)
    mode = 4 if glu else 1 if silu_mul else 0 if norm_weight is None else 2 if residual is None else 3  # gemv_int8.cu's Input
    nw = None if norm_weight is None else _aligned(norm_weight)
    res = None if residual is None else _aligned(residual)
    res_out = None if residual is None else torch.empty(K, dtype=torch.bfloat16, device=x.device)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    fp8 = qweight.dtype == torch.float8_e4m3fn
    err = (fn.fp8 if fp8 else fn)(qweight.data_ptr(), xv.data_ptr(), s.data_ptr(), ptr(b), y.data_ptr(), rows, K,
                                  16 if fp8 else WARPS, int(use_pdl), mode, PERSIST * _sms(_index(x)), ptr(res),
                                  ptr(nw), ptr(res_out), float(eps), torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"fastllm CUDA GEMV launch failed: cudaError {err}")
    return y if residual is None else (y, res_out)


def fits_int4(x: torch.Tensor, packed: torch.Tensor, pairs: torch.Tensor, group_size: int,
              silu_mul: bool = False) -> bool:
    """Whether gemv_int4 takes these operands: bf16 x (K <= Kp values, 2K with silu_mul), packed
    uint8 [N, Kp / 2] contiguous and 16-byte aligned, pairs fp32 [N, groups rounded up to even, 2]
    contiguous, group_size a multiple of 32."""
    N, half = packed.shape
    Kp = 2 * half
    K = x.numel() // 2 if silu_mul else x.numel()
    ng = Kp // group_size if group_size else 0
    return (x.dtype == torch.bfloat16 and packed.dtype == torch.uint8 and group_size % 32 == 0 and Kp % group_size == 0
            and 0 < K <= Kp and (not silu_mul or x.numel() % 2 == 0) and packed.is_contiguous()
            and packed.data_ptr() % 16 == 0 and pairs.dtype == torch.float32 and pairs.is_contiguous()
            and pairs.shape == (N, ng + ng % 2, 2))


def gemv_int4(x: torch.Tensor, packed: torch.Tensor, pairs: torch.Tensor, group_size: int,
              bias: torch.Tensor | None = None, silu_mul: bool = False, use_pdl: bool = False) -> torch.Tensor:
    """y [N] bf16 = dequant(W) @ x (+ bias) for fastllm.stages.quantizers.int4's storage (packed, and
    its (scale, zero) pairs from pack_scales); x bf16 [K] (or with silu_mul [2K]); see fits_int4."""
    if not fits_int4(x, packed, pairs, group_size, silu_mul):
        raise ValueError(f"gemv_int4 takes bf16 x and packed uint8 [N, Kp / 2] int4 weights with their pairs, got "
                         f"{x.dtype} {tuple(x.shape)}, {packed.dtype} {tuple(packed.shape)}, {tuple(pairs.shape)}")
    fn = _entry(_index(x))
    if fn is None:
        raise RuntimeError("the CUDA GEMV is not available on this machine (see the log)")
    N, Kp = packed.shape[0], packed.shape[1] * 2
    xv = x.reshape(-1).contiguous()
    K = xv.numel() // 2 if silu_mul else xv.numel()
    b = None if bias is None else bias.reshape(N).to(torch.bfloat16).contiguous()
    y = torch.empty(N, dtype=torch.bfloat16, device=x.device)
    err = fn.int4(packed.data_ptr(), pairs.data_ptr(), xv.data_ptr(), None if b is None else b.data_ptr(),
                  y.data_ptr(), N, K, Kp, group_size, pairs.shape[1], WARPS, int(use_pdl), int(silu_mul),
                  INT4_MINB, PERSIST4 * _sms(_index(x)), torch.cuda.current_stream(x.device).cuda_stream)
    if err != 0:
        raise RuntimeError(f"fastllm CUDA GEMV (int4) launch failed: cudaError {err}")
    return y

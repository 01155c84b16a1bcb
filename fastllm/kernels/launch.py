"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a decode step.

A kernel launched with PDL may start while the one before it in the stream is still finishing:
its programs become resident and wait (`gdc_wait`) until the previous kernel has completed and
its memory is visible, so a step of ~200 back-to-back kernels loses less of a launch-and-ramp gap
at each boundary. Every kernel launched this way must wait before it touches memory that an
earlier kernel writes (the wait is transitive: each kernel waits for the one before it). Work
that reads only constant memory may come before the wait: the GEMVs request their first weight
tile there, so the weight stream runs on through the boundary. A kernel lets the next one
launch (`gdc_launch_dependents`) right after its own wait or after its main loop; the step's small
kernels (the RMSNorm, decode attention's two) before it (TRIGGER_FIRST).
"""
from __future__ import annotations

import functools
import inspect
import os

import torch


ENABLED = True  # benchmarks switch it off to measure what it buys
# Autotuned picks are kept on disk (Triton's cache directory, keyed by the kernel's source, the
# card's architecture, the shape and the candidate configurations), so an engine's next start
# skips the tuning this one did. FASTLLM_AUTOTUNE_CACHE=0 tunes afresh in every process.
AUTOTUNE_CACHE = os.environ.get("FASTLLM_AUTOTUNE_CACHE", "1") != "0"


@functools.cache
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


# The small kernels of a decode step (the RMSNorm, decode attention's split and merge kernels) let
# the next kernel launch before they wait for the one before (USE_PDL = 2): once each of their
# programs has started, the next GEMV's programs take the room they leave on the SMs and request
# their first weights while these run, not after. (The next kernel still waits for this one to
# complete, and this one for the one before, so it sees every earlier kernel's writes.) H200,
# Llama-2-7B batch 1, two calls (scripts/quant_gpu.py "-waitfirst", 2026-11-28): int8 446.0 tok/s
# mean of three runs against 442.8, bf16 265.2 against 262.9.
TRIGGER_FIRST = True


def pdl(t: torch.Tensor, first: bool = False) -> dict:
    """Launch options for a kernel with a USE_PDL constexpr, for tensors on t's device; first: the
    kernel takes USE_PDL = 2 as "let the next kernel launch before waiting" (see TRIGGER_FIRST)."""
    if not ENABLED or t.device.type != "cuda" or not _supported(t.device.index if t.device.index is not None
                                                  else torch.cuda.current_device()):
        return {"USE_PDL": False}
    return {"USE_PDL": 2 if first and TRIGGER_FIRST else True, "launch_pdl": True}


try:
    import triton
    import triton.language as tl
except ImportError:  # (the kernels that call it need Triton anyway)
    pdl_wait = None
else:
    @triton.jit
    def pdl_wait(USE_PDL: tl.constexpr, LAUNCH_AFTER: tl.constexpr):
        """In a kernel launched with pdl(): wait for the kernel before. USE_PDL = 2 (pdl(t, first=True))
        lets the next kernel launch first; otherwise LAUNCH_AFTER lets it launch right after the wait
        (else the kernel calls gdc_launch_dependents itself, later)."""
        if USE_PDL == 2:
            tl.extra.cuda.gdc_launch_dependents()
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
        if USE_PDL == 1 and LAUNCH_AFTER:
            tl.extra.cuda.gdc_launch_dependents()


def tma_supported(t: torch.Tensor) -> bool:
    """Whether t's device has TMA (tensor descriptors in Triton): CUDA, compute capability 9.0+."""
    return t.device.type == "cuda" and _supported(t.device.index if t.device.index is not None
                                                  else torch.cuda.current_device())


def launch_rows(tuned, kernel, rows: int, args: tuple, flags: dict, config=None) -> None:
    """Launch a kernel whose grid is rows / BLOCK_N programs: autotuned (`tuned`), or with a
    pinned triton.Config (benchmarks, tests in Triton's interpreter)."""
    import triton

    if config is None:
        tuned[lambda meta: (triton.cdiv(rows, meta["BLOCK_N"]),)](*args, **flags)
    else:
        kernel[(triton.cdiv(rows, config.kwargs["BLOCK_N"]),)](*args, **flags, **config.kwargs,
                                                              num_warps=config.num_warps, num_stages=config.num_stages)


def autotune(configs: list, key: list[str], **options):
    """triton.autotune with its picks cached on disk (AUTOTUNE_CACHE; configurations with a
    pre_hook are re-tuned each process, as Triton cannot store them)."""
    import triton

    if AUTOTUNE_CACHE and "cache_results" in inspect.signature(triton.autotune).parameters:
        options["cache_results"] = True
    return triton.autotune(configs=configs, key=key, **options)

"""Weight prefetch into L2 from the latency-bound kernels of a decode step (Hopper and later).

Between two GEMVs of a small-batch decode step, the RMSNorm, RoPE and attention kernels wait on
latency, not bandwidth: HBM idles for a few microseconds per kernel. The next GEMV's weights
depend on nothing, so those kernels may ask L2 for them (TMA's bulk prefetch: one instruction per
chunk, no registers held, nothing waited for) before their own PDL wait, and the GEMV then finds
its first rows, or all of a small layer, in L2.

`l2_prefetch` is called inside such kernels, each program taking its share of the bytes;
`target` names the bytes a linear layer's GEMV streams.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import tma_supported

ENABLED = True  # benchmarks switch it off to measure what it buys
MAX_TOKENS = 16  # at more tokens a step's linear layers stop being weight streams
HEAD_BYTES = 8 << 20  # before a norm: the start of the next layer (about 3 us of HBM)
ATTENTION_BYTES = 24 << 20  # before attention: o_proj, up to this much
LANES = 32  # bulk prefetches per program (one per lane of a warp)


@triton.jit
def l2_prefetch(base, nbytes, part, parts, CHUNK: tl.constexpr, LANES: tl.constexpr):
    """Ask L2 for share `part` of `parts` of the nbytes at base, in LANES chunks of up to CHUNK
    bytes (16-byte multiples; a tail under 16 bytes is left out). base must be 16-byte aligned."""
    p = base.to(tl.pointer_type(tl.uint8))
    share = (nbytes // parts + CHUNK - 1) // CHUNK * CHUNK
    start = part.to(tl.int64) * share
    offs = start + tl.arange(0, LANES).to(tl.int64) * CHUNK
    end = tl.minimum(start + share, nbytes)
    size = tl.where(offs < end, tl.minimum(end - offs, CHUNK) // 16 * 16, 0).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [p + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def target(linear: torch.nn.Module, max_bytes: int, tokens: int) -> tuple[torch.Tensor, int] | None:
    """(tensor, bytes) of the weight a linear layer streams first (int8 / fp8 `qweight`, int4
    `packed`, else `weight`), capped at max_bytes; None where prefetch does not apply."""
    if not ENABLED or tokens > MAX_TOKENS:
        return None
    for name in ("qweight", "packed", "weight"):
        w = getattr(linear, name, None)
        if isinstance(w, torch.Tensor):
            break
    else:
        return None
    if type(w) not in (torch.Tensor, torch.nn.Parameter) or not (
            tma_supported(w) and w.is_contiguous() and w.data_ptr() % 16 == 0):
        return None
    return w, min(max_bytes, w.numel() * w.element_size())


def launch_args(prefetch: tuple[torch.Tensor, int] | None, programs: int, fallback: torch.Tensor) -> dict:
    """The kernel arguments of an optional prefetch spread over `programs` programs."""
    if prefetch is None:
        return dict(pf_ptr=fallback, pf_bytes=0, PREFETCH=False, PF_CHUNK=16, PF_LANES=LANES)
    t, nbytes = prefetch
    per_lane = -(-nbytes // (programs * LANES))
    chunk = max(4096, triton.next_power_of_2(per_lane))
    return dict(pf_ptr=t, pf_bytes=nbytes, PREFETCH=True, PF_CHUNK=chunk, PF_LANES=LANES)

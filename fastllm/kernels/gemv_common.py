"""Triton helpers shared by the GEMV kernels (fastllm.kernels.gemv, gemv_bytes, qgemm): the input
vector as the unfused ops would round it, a weight tile in fp32, and the PDL wait as a value
(`_after_wait`)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _input(x_ptr, res_ptr, cols, col_ok, K, HAS_RES: tl.constexpr, SILU_MUL: tl.constexpr):
    """The fp32 input vector at `cols` before any norm, rounded as the unfused ops round it."""
    x, u, r, _ = _input_raw(x_ptr, res_ptr, x_ptr, cols, col_ok, K, HAS_RES, False, SILU_MUL)
    return _input_of(x, u, r, HAS_RES, SILU_MUL)


@triton.jit
def _input_raw(x_ptr, res_ptr, nw_ptr, cols, col_ok, K, HAS_RES: tl.constexpr, NORM: tl.constexpr,
               SILU_MUL: tl.constexpr):
    """The loads behind _input and the norm weight, unconverted: (x, up, residual, norm weight),
    the unused ones standing in as x. Requested a tile ahead by the prefetching word kernel."""
    x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
    u = tl.load(x_ptr + K + cols, mask=col_ok, other=0.0) if SILU_MUL else x
    r = tl.load(res_ptr + cols, mask=col_ok, other=0.0) if HAS_RES else x
    nw = tl.load(nw_ptr + cols, mask=col_ok, other=0.0) if NORM else x
    return x, u, r, nw


@triton.jit
def _input_of(x, u, r, HAS_RES: tl.constexpr, SILU_MUL: tl.constexpr):
    """_input from _input_raw's loads."""
    dt: tl.constexpr = x.dtype
    x = x.to(tl.float32)
    if SILU_MUL:
        x = (x / (1.0 + tl.exp(-x)) * u.to(tl.float32)).to(dt).to(tl.float32)
    if HAS_RES:
        x = (x + r.to(tl.float32)).to(dt).to(tl.float32)
    return x


@triton.jit
def _weight_f32(w, VIA_BITS: tl.constexpr):
    """A weight tile in fp32. With VIA_BITS, int8 goes through the float's bits (2^23 + 128 + q,
    minus that offset: exact) instead of an int-to-float conversion instruction, which runs at a
    fraction of the FMA rate."""
    if VIA_BITS and w.dtype == tl.int8:
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        return w.to(tl.float32)


@triton.jit
def _after_wait(k, STEP: tl.constexpr, tile, DEPTH: tl.constexpr):
    """k (a multiple of STEP), returned by an instruction after the PDL wait: inputs addressed
    through it are read only once the kernel before has completed, while loads that do not use it
    may start earlier. Returned as a multiple of STEP, so Triton still knows the addresses'
    alignment (and vectorizes). DEPTH 1: the wait depends on k alone, and Triton's pipeline issues
    it right after the first weight tile's request. DEPTH 2: it also depends on `tile` (the weight
    tile just arrived, reduced to one value), so it comes in the pipeline's consuming stage, after
    the requests of the whole prologue."""
    if DEPTH == 2:
        dep = tl.max(tile, axis=None).to(tl.int32, bitcast=True)
    else:
        dep = k
    return tl.inline_asm_elementwise("griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;",
                                     "=r,r,r", [k // STEP, dep], dtype=tl.int32, is_pure=True, pack=1) * STEP

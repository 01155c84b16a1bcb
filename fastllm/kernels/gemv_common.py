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
def _unpack4(v, BF16: tl.constexpr):
    """The four 16-bit floats packed in each int64 of v (element j in bits 16 j .. 16 j + 15),
    as four fp32 tensors of v's shape (exact)."""
    lo = v.to(tl.int32)  # truncates: elements 0 and 1
    hi = (v >> 32).to(tl.int32)
    if BF16:  # a bf16 is the top half of the fp32 of the same value
        return ((lo << 16).to(tl.float32, bitcast=True), (lo & -65536).to(tl.float32, bitcast=True),
                (hi << 16).to(tl.float32, bitcast=True), (hi & -65536).to(tl.float32, bitcast=True))
    else:
        return (lo.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                (lo >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                hi.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
                (hi >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def _load_b64(ptrs, ok, ASM: tl.constexpr):
    """int64 loads at ptrs (0 where not ok). With ASM, each thread loads the elements it holds in the
    layout Triton gives `ptrs`: inline PTX, which Triton's coalescing pass leaves alone (a tt.load
    gets the pass's own layout, and a layout change after it goes through shared memory). The asm
    is not pure, so it stays after the PDL wait."""
    if ASM:
        v = tl.inline_asm_elementwise("ld.global.b64 $0, [$1];", "=l,l", [ptrs], dtype=tl.int64, is_pure=False,
                                      pack=1)
        return tl.where(ok, v, 0)
    else:
        return tl.load(ptrs, mask=ok, other=0)


@triton.jit
def _input_planes(x_ptr, c, c_ok, KW, SILU_MUL: tl.constexpr, ASM: tl.constexpr):
    """_input (no residual) for the word GEMVs: the inputs of word columns c (values 4 c .. 4 c + 3)
    as four fp32 tensors of c's shape, one per byte of the words. Each word's four 16-bit inputs
    come in one 8-byte load, in c's layout (_load_b64), so the weight tile needs no layout change of
    its inputs (which Triton makes through shared memory, with CTA barriers, for a [BW, 4] input
    split into four). x_ptr: 16-bit floats, 8-byte aligned; KW = K / 4; SILU_MUL: x is [gate, up],
    rounded as _input rounds it. Columns not c_ok read as 0."""
    dt: tl.constexpr = x_ptr.dtype.element_ty
    BF16: tl.constexpr = dt == tl.bfloat16
    xq = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    cc = tl.where(c_ok, c, 0)  # in bounds, for the unmasked asm loads
    x0, x1, x2, x3 = _unpack4(_load_b64(xq + cc, c_ok, ASM), BF16)
    if SILU_MUL:  # the up half starts K values (KW words) after the gate half
        u0, u1, u2, u3 = _unpack4(_load_b64(xq + KW + cc, c_ok, ASM), BF16)
        x0 = (x0 / (1.0 + tl.exp(-x0)) * u0).to(dt).to(tl.float32)
        x1 = (x1 / (1.0 + tl.exp(-x1)) * u1).to(dt).to(tl.float32)
        x2 = (x2 / (1.0 + tl.exp(-x2)) * u2).to(dt).to(tl.float32)
        x3 = (x3 / (1.0 + tl.exp(-x3)) * u3).to(dt).to(tl.float32)
    return x0, x1, x2, x3


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

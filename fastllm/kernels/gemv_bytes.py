"""The int8 / fp8 GEMV kernels (Triton) behind fastllm.kernels.gemv: row-scaled 8-bit weights
read as int32 words of four values, widened in one instruction each (`_bytes_f32`); the word
kernel keeps the next tile packed in registers, the TMA kernel pipelines tiles in shared memory."""
from __future__ import annotations

import triton
import triton.language as tl

from .gemv_common import _after_wait, _input, _input_of, _input_raw

# _bytes_f32's int8 values carry this offset (q + INT8_OFFSET); the GEMV subtracts INT8_OFFSET * sum(x).
INT8_OFFSET = tl.constexpr(32896.0)


@triton.jit
def _bytes_f32(w, FP8: tl.constexpr, ASM: tl.constexpr):
    """The four 8-bit weights in each int32 word of w (byte j = column 4 c + j), in fp32, one
    instruction each (PTX; ASM=False computes the same values in plain Triton, for the interpreter).

    int8 (FP8=False): each byte q + 128 goes into the mantissa of 2^15 (one prmt), giving exactly
    q + INT8_OFFSET (32768 + 128 + q); with 2^15 as the base, not 2^23, the common term costs 8 of
    fp32's 24 bits. fp8 e4m3: two values per cvt to f16x2, then f16 to f32 (exact)."""
    if ASM:
        if FP8:
            return tl.inline_asm_elementwise(
                asm="""{ .reg .b16 a, b, e0, e1, e2, e3; .reg .b32 h0, h1;
                mov.b32 {a, b}, $4;
                cvt.rn.f16x2.e4m3x2 h0, a;
                cvt.rn.f16x2.e4m3x2 h1, b;
                mov.b32 {e0, e1}, h0;
                mov.b32 {e2, e3}, h1;
                cvt.f32.f16 $0, e0;
                cvt.f32.f16 $1, e1;
                cvt.f32.f16 $2, e2;
                cvt.f32.f16 $3, e3; }""",
                constraints="=r,=r,=r,=r,r", args=[w], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(
                asm="""{ .reg .b32 t, m;
                xor.b32 t, $4, 0x80808080;
                mov.b32 m, 0x47000000;
                prmt.b32 $0, t, m, 0x7604;
                prmt.b32 $1, t, m, 0x7614;
                prmt.b32 $2, t, m, 0x7624;
                prmt.b32 $3, t, m, 0x7634; }""",
                constraints="=r,=r,=r,=r,r", args=[w], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        b0, b1, b2, b3 = w & 0xFF, (w >> 8) & 0xFF, (w >> 16) & 0xFF, (w >> 24) & 0xFF
        if FP8:
            return (b0.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32),
                    b1.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32),
                    b2.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32),
                    b3.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32))
        else:
            return (((b0 ^ 0x80) << 8 | 0x47000000).to(tl.float32, bitcast=True),
                    ((b1 ^ 0x80) << 8 | 0x47000000).to(tl.float32, bitcast=True),
                    ((b2 ^ 0x80) << 8 | 0x47000000).to(tl.float32, bitcast=True),
                    ((b3 ^ 0x80) << 8 | 0x47000000).to(tl.float32, bitcast=True))


@triton.jit
def _bytes_tile(acc, xs, w, x, BW: tl.constexpr, FP8: tl.constexpr, ASM: tl.constexpr):
    """One word tile of the int8 / fp8 word GEMVs: acc [BLOCK_N, BW] + the four values of each word
    times their inputs x [BW, 4]; for int8 also xs [BW] + the inputs' sum (for INT8_OFFSET)."""
    xa, xb = tl.split(tl.reshape(x, [BW, 2, 2]))
    x0, x2 = tl.split(xa)
    x1, x3 = tl.split(xb)
    v0, v1, v2, v3 = _bytes_f32(w, FP8, ASM)
    acc = tl.fma(v0, x0[None, :], acc)
    acc = tl.fma(v1, x1[None, :], acc)
    acc = tl.fma(v2, x2[None, :], acc)
    acc = tl.fma(v3, x3[None, :], acc)
    if not FP8:
        xs += (x0 + x1) + (x2 + x3)
    return acc, xs


@triton.jit
def _gemv_bytes_kernel(x_ptr, w_ptr, b_ptr, y_ptr, res_ptr, nw_ptr, res_out_ptr, scale_ptr, N, K, stride_w, eps,
                       HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, SILU_MUL: tl.constexpr,
                       FP8: tl.constexpr, ASM: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
                       PREFETCH_X: tl.constexpr = False, AHEAD: tl.constexpr = 1):
    """_gemv_kernel for row-scaled int8 / fp8 weights, read as int32 words of four values: a word
    tile stays packed in registers from its load (one iteration ahead) to its conversion, and each
    value converts in one instruction (_bytes_f32). w_ptr is the weight viewed as int32 [N, K / 4];
    stride_w counts words. PREFETCH_X: the inputs (and norm weight) are requested a tile ahead too,
    as the int4 word kernel does (there it made the GEMV 5-17% faster on an H100). AHEAD (1 or 2):
    weight tiles held in registers ahead of the one being used; the first AHEAD tiles are
    requested before the PDL wait."""
    pid = tl.program_id(0)
    BW: tl.constexpr = BLOCK_K // 4  # words per row of a tile
    KW = K // 4
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    c = tl.arange(0, BW)
    w = tl.load(w_rows + c[None, :], mask=row_ok[:, None] & (c < KW)[None, :], other=0,
                eviction_policy="evict_first")
    w1 = w
    if AHEAD == 2:
        w1 = tl.load(w_rows + (c + BW)[None, :], mask=row_ok[:, None] & (c + BW < KW)[None, :], other=0,
                     eviction_policy="evict_first")
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_N, BW), dtype=tl.float32)
    ss = tl.zeros((BW, 4), dtype=tl.float32)
    xs = tl.zeros((BW,), dtype=tl.float32)  # int8: the sum of x per word column, for the offset
    if PREFETCH_X:
        cols = 4 * c[:, None] + tl.arange(0, 4)[None, :]
        xr, ur, rr, nwr = _input_raw(x_ptr, res_ptr, nw_ptr, cols, cols < K, K, HAS_RES, NORM, SILU_MUL)
    for k in range(0, K, BLOCK_K):
        c = k // 4 + tl.arange(0, BW)
        nxt = c + AHEAD * BW
        w_next = tl.load(w_rows + nxt[None, :], mask=row_ok[:, None] & (nxt < KW)[None, :], other=0,
                         eviction_policy="evict_first")
        cols = 4 * c[:, None] + tl.arange(0, 4)[None, :]  # [BW, 4]: column of byte j of word c
        col_ok = cols < K
        if PREFETCH_X:
            cn = cols + BLOCK_K
            xn, un, rn, nwn = _input_raw(x_ptr, res_ptr, nw_ptr, cn, cn < K, K, HAS_RES, NORM, SILU_MUL)
            x = _input_of(xr, ur, rr, HAS_RES, SILU_MUL)
        else:
            x = _input(x_ptr, res_ptr, cols, col_ok, K, HAS_RES, SILU_MUL)
        if NORM:
            if HAS_RES:
                if pid == 0:
                    tl.store(res_out_ptr + cols, x.to(res_out_ptr.dtype.element_ty), mask=col_ok)
            ss += x * x
            if PREFETCH_X:
                x = x * nwr.to(tl.float32)
            else:
                x = x * tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if PREFETCH_X:
            xr, ur, rr, nwr = xn, un, rn, nwn
        acc, xs = _bytes_tile(acc, xs, w, x, BW, FP8, ASM)
        if AHEAD == 2:
            w = w1
            w1 = w_next
        else:
            w = w_next
    if not FP8:
        acc -= INT8_OFFSET * xs[None, :]
    y = tl.sum(acc, axis=1)
    if NORM:
        y = y * tl.rsqrt(tl.sum(tl.sum(ss, axis=1), axis=0) / K + eps)
    y = y * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_bytes_tma_kernel(x_ptr, w_desc, b_ptr, y_ptr, scale_ptr, N, K,
                           HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, FP8: tl.constexpr, ASM: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                           USE_PDL: tl.constexpr, HEAD_START: tl.constexpr = 0):
    """_gemv_bytes_kernel (without the norm) with the weight words brought in by TMA: w_desc over
    int32 [N, K / 4], block [BLOCK_N, BLOCK_K / 4]. Triton pipelines the loop STAGES deep in shared
    memory, so the bytes in flight do not cost registers. Rows and columns past the weight read as
    zeros. HEAD_START (under PDL, 1 or 2): the wait moves into the loop, into the inputs' addresses
    (_after_wait, of that depth), so weight tiles are requested before it, while the kernel
    before still runs."""
    pid = tl.program_id(0)
    BW: tl.constexpr = BLOCK_K // 4
    row0 = pid * BLOCK_N
    if USE_PDL and not HEAD_START:  # x comes from the kernel before; the pipeline's first loads wait too
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_N, BW), dtype=tl.float32)
    xs = tl.zeros((BW,), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        w = w_desc.load([row0, k // 4])
        k_x = k
        if USE_PDL and HEAD_START:
            k_x = _after_wait(k, BLOCK_K, w, HEAD_START)
        cols = 4 * (k_x // 4 + tl.arange(0, BW))[:, None] + tl.arange(0, 4)[None, :]  # [BW, 4]
        x = _input(x_ptr, x_ptr, cols, cols < K, K, False, SILU_MUL)
        acc, xs = _bytes_tile(acc, xs, w, x, BW, FP8, ASM)
    if not FP8:
        acc -= INT8_OFFSET * xs[None, :]
    y = tl.sum(acc, axis=1)
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = y * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

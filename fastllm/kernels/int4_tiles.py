"""Triton arithmetic of the int4 GEMVs (fastllm.kernels.gemv_int4): nibbles unpacked into floats,
the (scale, zero) pairs of a tile, and a tile's products in floats (`_int4_tile`) or in integer
dp4a (`_int4_tile_dp4a`)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _nibbles(w, ASM: tl.constexpr):
    """Per int32 word of 4 bytes (nibbles lo_b, hi_b of byte b, columns 2b and 2b + 1): the
    fp32 values 128 + lo_0, 128 + hi_0, ..., 128 + hi_3 (exact): each nibble is placed in the
    mantissa of 128.0 by one PTX prmt, after one mask (and a shift) per word. Plain Triton
    computes the same values in the interpreter."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""{ .reg .b32 l, h, m;
            mov.b32 m, 0x43000000;
            and.b32 l, $8, 0x0F0F0F0F;
            shr.u32 h, $8, 4;
            and.b32 h, h, 0x0F0F0F0F;
            prmt.b32 $0, l, m, 0x7054;
            prmt.b32 $1, h, m, 0x7054;
            prmt.b32 $2, l, m, 0x7154;
            prmt.b32 $3, h, m, 0x7154;
            prmt.b32 $4, l, m, 0x7254;
            prmt.b32 $5, h, m, 0x7254;
            prmt.b32 $6, l, m, 0x7354;
            prmt.b32 $7, h, m, 0x7354; }""",
            constraints="=r,=r,=r,=r,=r,=r,=r,=r,r", args=[w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        return (((w & 0xF) << 16 | 0x43000000).to(tl.float32, bitcast=True),
                (((w >> 4) & 0xF) << 16 | 0x43000000).to(tl.float32, bitcast=True),
                (((w >> 8) & 0xF) << 16 | 0x43000000).to(tl.float32, bitcast=True),
                (((w >> 12) & 0xF) << 16 | 0x43000000).to(tl.float32, bitcast=True),
                (((w >> 16) & 0xF) << 16 | 0x43000000).to(tl.float32, bitcast=True),
                (((w >> 20) & 0xF) << 16 | 0x43000000).to(tl.float32, bitcast=True),
                (((w >> 24) & 0xF) << 16 | 0x43000000).to(tl.float32, bitcast=True),
                (((w >> 28) & 0xF) << 16 | 0x43000000).to(tl.float32, bitcast=True))


@triton.jit
def _int4_scales(s_ptr, z_ptr, rows, row_ok, g0, Kp, stride_sn, stride_sg, G: tl.constexpr, GROUPS: tl.constexpr,
                 PAIRS: tl.constexpr, NO_SZ: tl.constexpr):
    """[BLOCK_N, GROUPS, 2]: (scale, zero) of groups g0.. (g0 a multiple of GROUPS). PAIRS: read
    interleaved, each row's 2 * GROUPS values contiguous (16-byte loads: stride_sn, the padded row,
    is a multiple of 4 and the padding is zero)."""
    if NO_SZ:
        return tl.zeros((rows.shape[0], GROUPS, 2), dtype=tl.float32)
    elif PAIRS:
        c = 2 * g0 + tl.arange(0, 2 * GROUPS)
        m = row_ok[:, None] & (c < tl.multiple_of(stride_sn, 4))[None, :]
        sz = tl.load(s_ptr + rows[:, None] * stride_sn + c[None, :], mask=m, other=0.0)
        return tl.reshape(sz, [rows.shape[0], GROUPS, 2])
    else:
        g = g0 + tl.arange(0, GROUPS)
        o = rows[:, None] * stride_sn + g[None, :] * stride_sg
        m = row_ok[:, None] & (g < Kp // G)[None, :]
        return tl.join(tl.load(s_ptr + o, mask=m, other=0.0), tl.load(z_ptr + o, mask=m, other=0.0))


@triton.jit
def _int4_tile(acc, wt, xt, sz, GROUPS: tl.constexpr, W: tl.constexpr, ASM: tl.constexpr):
    """acc [BLOCK_N, GROUPS, W] + each word's scaled dot product: wt int32 words [BLOCK_N, GROUPS, W],
    xt the tile's inputs [GROUPS, W, 8] (fp32), sz its (scale, zero) pairs [BLOCK_N, GROUPS, 2]."""
    xa, xb = tl.split(tl.reshape(xt, [GROUPS, W, 4, 2]))  # columns 8c + 2j, 8c + 2j + 1
    x0, x2 = tl.split(tl.reshape(xa, [GROUPS, W, 2, 2]))  # (columns 0, 4), (2, 6) of the word
    x0, x4 = tl.split(x0)
    x2, x6 = tl.split(x2)
    x1, x3 = tl.split(tl.reshape(xb, [GROUPS, W, 2, 2]))
    x1, x5 = tl.split(x1)
    x3, x7 = tl.split(x3)
    xw = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
    s, z = tl.split(sz)
    s = s[:, :, None]
    z = z[:, :, None]
    v0, v1, v2, v3, v4, v5, v6, v7 = _nibbles(wt, ASM)
    p = -(z + 128.0) * xw[None]  # sum (128 + q) x - (128 + zero) sum x = sum (q - zero) x
    p = tl.fma(v0, x0[None], p)
    p = tl.fma(v1, x1[None], p)
    p = tl.fma(v2, x2[None], p)
    p = tl.fma(v3, x3[None], p)
    p = tl.fma(v4, x4[None], p)
    p = tl.fma(v5, x5[None], p)
    p = tl.fma(v6, x6[None], p)
    p = tl.fma(v7, x7[None], p)
    return tl.fma(s, p, acc)


@triton.jit
def _dp4a(a, b, c, B_SIGNED: tl.constexpr, ASM: tl.constexpr):
    """c + the dot product of the four unsigned bytes of each int32 of a with the four bytes of b
    (signed or unsigned): one dp4a instruction (PTX) per word; plain Triton without ASM."""
    if ASM:
        if B_SIGNED:
            return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("dp4a.u32.u32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
    else:
        for j in tl.static_range(4):
            bj = (b << (24 - 8 * j)) >> 24 if B_SIGNED else (b >> (8 * j)) & 0xFF
            c += ((a >> (8 * j)) & 0xFF) * bj
        return c


@triton.jit
def _byte_planes(q0, q1, q2, q3):
    """Four 16-bit fixed-point values per position as two int32 words of bytes, q_j = 256 hi_j +
    lo_j with hi_j in byte j of the first (signed, -128..127) and lo_j of the second (unsigned)."""
    hi = ((q0 >> 8) & 0xFF) | (((q1 >> 8) & 0xFF) << 8) | (((q2 >> 8) & 0xFF) << 16) | ((q3 >> 8) << 24)
    lo = (q0 & 0xFF) | ((q1 & 0xFF) << 8) | ((q2 & 0xFF) << 16) | ((q3 & 0xFF) << 24)
    return hi, lo


@triton.jit
def _int4_tile_dp4a(acc, wt, xt, sz, GROUPS: tl.constexpr, W: tl.constexpr, ASM: tl.constexpr):
    """_int4_tile in integer arithmetic: the tile's inputs xt [GROUPS, W, 8] go to 16-bit fixed
    point against their largest magnitude (one scale per tile), split into a high and a low byte
    plane for the even and for the odd columns; a word's even and odd nibbles (two masks, one
    shift) meet them in four dp4a. Per word, sum((q - zero) x) = sx (P - zero sum(xf)) with P the
    exact int32 product sum and xf the fixed-point inputs: about 1.5 instructions per weight
    against _int4_tile's 4. The inputs' rounding (at most amax / 65534 each) is the only one
    added."""
    amax = tl.max(tl.max(tl.max(tl.abs(xt), axis=2), axis=1), axis=0)
    inv = tl.where(amax > 0.0, 32767.0 / tl.where(amax > 0.0, amax, 1.0), 0.0)
    q = (xt * inv + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000  # round(xt * inv): 1.5 * 2^23 [GROUPS, W, 8]
    qe, qo = tl.split(tl.reshape(q, [GROUPS, W, 4, 2]))  # columns 8c + 2j (even nibbles), 8c + 2j + 1
    e02, e13 = tl.split(tl.reshape(qe, [GROUPS, W, 2, 2]))  # j = (0, 2), (1, 3)
    e0, e2 = tl.split(e02)
    e1, e3 = tl.split(e13)
    o02, o13 = tl.split(tl.reshape(qo, [GROUPS, W, 2, 2]))
    o0, o2 = tl.split(o02)
    o1, o3 = tl.split(o13)
    eh, el = _byte_planes(e0, e1, e2, e3)
    oh, ol = _byte_planes(o0, o1, o2, o3)
    xw = ((e0 + e1) + (e2 + e3)) + ((o0 + o1) + (o2 + o3))  # [GROUPS, W], exact
    even = wt & 0x0F0F0F0F
    odd = (wt >> 4) & 0x0F0F0F0F
    hi = _dp4a(even, eh[None], _dp4a(odd, oh[None], tl.zeros_like(wt), True, ASM), True, ASM)
    lo = _dp4a(even, el[None], _dp4a(odd, ol[None], tl.zeros_like(wt), False, ASM), False, ASM)
    # |256 hi + lo| <= 8 * 15 * 32767 < 2^22: exact in fp32 through the float's bits
    p = ((hi * 256 + lo) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    s, z = tl.split(sz)
    p = tl.fma(-z[:, :, None], xw.to(tl.float32)[None], p)
    return tl.fma((s * (amax / 32767.0))[:, :, None], p, acc)

"""Experimental: the int4 and int8/fp8 word GEMVs with the weight stream through TMA (tensor
descriptors), pipelined STAGES deep in shared memory by Triton (tl.range num_stages), so the
bytes in flight per SM no longer cost registers."""
import triton
import triton.language as tl

from .gemv import INT8_OFFSET, _bytes_f32
from .gemv_int4 import _nibbles


@triton.jit
def _gemv_int4_tma_kernel(x_ptr, w_desc, sz_desc, b_ptr, y_ptr, N, K, Kp,
                          G: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_W: tl.constexpr, USE_PDL: tl.constexpr, WAIT_IN_LOOP: tl.constexpr, STAGES: tl.constexpr = 3):
    pid = tl.program_id(0)
    W: tl.constexpr = G // 8
    GROUPS: tl.constexpr = BLOCK_W // W
    row0 = pid * BLOCK_N
    offs = tl.arange(0, GROUPS)[:, None] * W + tl.arange(0, W)[None, :]
    kx = (8 * offs)[:, :, None] + tl.arange(0, 8)[None, None, :]
    if USE_PDL and not WAIT_IN_LOOP:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_N, GROUPS, W), dtype=tl.float32)
    for k0 in tl.range(0, Kp, BLOCK_W * 8, num_stages=STAGES):
        wt = tl.reshape(w_desc.load([row0, k0 // 8]), [BLOCK_N, GROUPS, W])
        sz = tl.reshape(sz_desc.load([row0, 2 * (k0 // G)]), [BLOCK_N, GROUPS, 2])
        if USE_PDL and WAIT_IN_LOOP:
            if k0 == 0:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
        kk = k0 + kx
        xx = tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
        xa, xb = tl.split(tl.reshape(xx, [GROUPS, W, 4, 2]))
        x0, x2 = tl.split(tl.reshape(xa, [GROUPS, W, 2, 2]))
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
        p = -(z + 128.0) * xw[None]
        p = tl.fma(v0, x0[None], p)
        p = tl.fma(v1, x1[None], p)
        p = tl.fma(v2, x2[None], p)
        p = tl.fma(v3, x3[None], p)
        p = tl.fma(v4, x4[None], p)
        p = tl.fma(v5, x5[None], p)
        p = tl.fma(v6, x6[None], p)
        p = tl.fma(v7, x7[None], p)
        acc = tl.fma(s, p, acc)
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_bytes_tma_kernel(x_ptr, w_desc, y_ptr, scale_ptr, N, K,
                           FP8: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           USE_PDL: tl.constexpr, STAGES: tl.constexpr = 3):
    pid = tl.program_id(0)
    BW: tl.constexpr = BLOCK_K // 4
    row0 = pid * BLOCK_N
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros((BLOCK_N, BW), dtype=tl.float32)
    xs = tl.zeros((BW,), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        w = w_desc.load([row0, k // 4])
        c = k // 4 + tl.arange(0, BW)
        cols = 4 * c[:, None] + tl.arange(0, 4)[None, :]
        x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
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
    if not FP8:
        acc -= INT8_OFFSET * xs[None, :]
    y = tl.sum(acc, axis=1)
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = y * tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

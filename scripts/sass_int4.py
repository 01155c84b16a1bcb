"""Instruction counts of the int4 batch-1 GEMV loops as Triton compiles them for sm_90, on a machine
without a GPU (a Triton with the CUDA backend: its ptxas and cuobjdump): the TMA kernel in integer
arithmetic (gemv_int4._gemv_int4_tma_kernel, DP4A) per configuration, and a tensor-core prototype
(kept here, not in fastllm) that unpacks nibbles to bf16 128 + q with PTX (prmt, lop3) and
multiplies by tl.dot against the input in one column of a [K, 16] operand. Prints, per loop,
instructions per weight per thread and the commonest opcodes.
Usage: python scripts/sass_int4.py [BLOCK_N,BLOCK_W,num_warps,STAGES ...]"""
import os
import sys

import triton
import triton.language as tl

from fastllm.kernels.gemv_int4 import _gemv_int4_tma_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sass_common import compile_sm90, loops, opcodes  # noqa: E402

if {"-h", "--help"} & set(sys.argv[1:]):
    sys.exit(print(__doc__))


@triton.jit
def _unpack_bf16(b):
    """uint8 bytes (two nibbles, low = even column) -> (128 + low, 128 + high) in bf16, exact."""
    return tl.inline_asm_elementwise(
        asm="""{ .reg .b32 t0, t1;
        prmt.b32 t0, $4, 0, 0x4140;
        prmt.b32 t1, $4, 0, 0x4342;
        lop3.b32 $0, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $1, t1, 0x000F000F, 0x43004300, 0xEA;
        shr.b32 t0, t0, 4;
        shr.b32 t1, t1, 4;
        lop3.b32 $2, t0, 0x000F000F, 0x43004300, 0xEA;
        lop3.b32 $3, t1, 0x000F000F, 0x43004300, 0xEA; }""",
        constraints="=r,=r,=r,=r,r", args=[b], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _gemv_int4_mma_prototype(x_ptr, w_desc, sz_ptr, y_ptr, N, K, Kp, stride_sz, G: tl.constexpr,
                             BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """One group per iteration: y += s (W128 x - (128 + zero) sum x), W128 = 128 + q through tl.dot."""
    row0 = tl.program_id(0) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    GB: tl.constexpr = G // 2
    c16 = tl.arange(0, 16)
    i = tl.arange(0, GB)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    for g in tl.range(0, Kp // G, num_stages=STAGES):
        lo, hi = _unpack_bf16(w_desc.load([row0, g * GB]))  # even and odd columns of the group
        k = g * G + 2 * i
        m0 = (c16 == 0)[None, :]  # the input in column 0 of the [GB, 16] operand, zeros elsewhere
        xe = tl.load(x_ptr + k[:, None] + c16[None, :] * 0, mask=m0 & (k < K)[:, None], other=0.0)
        xo = tl.load(x_ptr + k[:, None] + 1 + c16[None, :] * 0, mask=m0 & (k + 1 < K)[:, None], other=0.0)
        d = tl.dot(hi, xo, tl.dot(lo, xe))
        xs = tl.sum(tl.sum(xe.to(tl.float32) + xo.to(tl.float32), axis=1), axis=0)
        s = tl.load(sz_ptr + rows * stride_sz + 2 * g, mask=row_ok, other=0.0)
        z = tl.load(sz_ptr + rows * stride_sz + 2 * g + 1, mask=row_ok, other=0.0)
        acc += s[:, None] * (d - ((z + 128.0) * xs)[:, None] * m0.to(tl.float32))
    tl.store(y_ptr + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)


def counted(fn, sig, cons, warps):
    """Registers, and per loop of more than 10 instructions: its length and commonest opcodes."""
    sass, regs = compile_sm90(fn, dict(sig, **{k: "constexpr" for k in cons}), cons, ("N", "K", "Kp", "stride_sz"),
                              warps, 1)
    return regs, [(len(body), opcodes(body).most_common(10)) for body in loops(sass) if len(body) > 10]


configs = [tuple(int(v) for v in a.split(",")) for a in sys.argv[1:]] or [(32, 64, 2, 3), (32, 128, 4, 3), (16, 128, 2, 3)]
for bn, bw, w, st in configs:
    regs, found = counted(_gemv_int4_tma_kernel,
                        {"x_ptr": "*bf16", "w_desc": f"tensordesc<i32[{bn}, {bw}]>",
                         "sz_desc": f"tensordesc<fp32[{bn}, {2 * bw * 8 // 128}]>", "b_ptr": "*bf16", "y_ptr": "*bf16",
                         "N": "i32", "K": "i32", "Kp": "i32"},
                        dict(G=128, HAS_BIAS=False, ASM=True, BLOCK_N=bn, BLOCK_W=bw, STAGES=st, USE_PDL=True,
                             DP4A=True, HEAD_START=1, SILU_MUL=False), w)
    for n, ops in found:
        print(f"tma dp4a ({bn}, {bw}, {w}, {st}): {regs} registers, loop {n} instructions, "
              f"{n / (bn * bw * 8 / (32 * w)):.2f} per weight per thread: {ops}")
for bn, w in [(16, 1), (32, 1), (64, 1)]:
    regs, found = counted(_gemv_int4_mma_prototype,
                        {"x_ptr": "*bf16", "w_desc": f"tensordesc<u8[{bn}, 64]>", "sz_ptr": "*fp32", "y_ptr": "*bf16",
                         "N": "i32", "K": "i32", "Kp": "i32", "stride_sz": "i32"},
                        dict(G=128, BLOCK_N=bn, STAGES=4), w)
    for n, ops in found:
        print(f"mma prototype ({bn} rows, {w} warps): {regs} registers, loop {n} instructions, "
              f"{n / (bn * 128 / (32 * w)):.2f} per weight per thread: {ops}")

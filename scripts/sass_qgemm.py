"""The int8 weight-only GEMM's main loop as Hopper machine code, compiled here without a GPU:
fastllm.kernels.qgemm's kernel (the swapped product, bf16 inputs) and a prototype with the
weights stored in the tensor cores' register order, each with its weight conversion variants.
It prints, per variant, the instructions per warp in the K loop, the registers, and how the
weight bytes leave shared memory (LDS.U16: two bytes per load; LDS.128: sixteen).

The prototype's storage permutes each row's columns within blocks of 64: column k = 16 j + 8 h +
2 t + p (j: which 16-column step, t: the lane's position in its quad, h, p: the lane's four values
per step) is stored at 16 t + 4 j + 2 h + p, so each lane's 16 bytes of four steps lie together
and one 16-byte load brings them (scripts/qgemm_layout.py: the prototype, timed there on a GPU).
(The GEMV would read the same storage with its input vector permuted alike.)

Usage: python scripts/sass_qgemm.py [BLOCK_M,BLOCK_N,BLOCK_K,warps,stages ...]
(default: 256,128,64,8,3 and 128,128,64,4,4). Needs Triton's bundled cuobjdump (triton >= 3.2).
"""
import collections
import os
import re
import sys

from fastllm.kernels import qgemm as Q

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qgemm_layout import _permuted_kernel  # noqa: E402 (the prototype, timed on a GPU there)
from sass_common import compile_sm90, loops, opcodes  # noqa: E402

if {"-h", "--help"} & set(sys.argv[1:]):
    sys.exit(print(__doc__))


def main_loop(sass: str) -> list[str]:
    """The instructions of the backward branch's body that holds the most HGMMAs."""
    return max(loops(sass), key=lambda body: sum("HGMMA" in j for j in body), default=[])


def describe(name: str, sass: str, regs: int) -> str:
    body = main_loop(sass)
    ops = opcodes(body)
    lds = collections.Counter(m for i in body for m in re.findall(r"\bLDS(?:\.\w+)?", i))
    return (f"{name:44s} {len(body):4d} instructions/warp/K step, {regs:3d} registers, HGMMA {ops['HGMMA']}, "
            f"loads from shared memory {dict(lds)}; top: {ops.most_common(6)}")


tiles = [tuple(int(v) for v in a.split(",")) for a in sys.argv[1:]] or [(256, 128, 64, 8, 3), (128, 128, 64, 4, 4)]
ints = ("M", "N", "K", "Kw", "M_BUCKET", "stride_xm", "stride_w", "stride_s", "stride_sg", "stride_ym")
ptr = {"x_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "z_ptr": "*fp32",
       "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
for bm, bn, bk, warps, stages in tiles:
    tile = f"({bm}, {bn}, {bk}), {warps} warps, {stages} stages"
    sig = {n: ptr.get(n, "i32" if n in ints else "constexpr") for n in Q._qgemm_kernel.arg_names}
    consts = dict(INT4=False, G=1, HAS_BIAS=False, UPCAST=False, DOT_PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_K=bk, SWAP=True, SPLIT_K=1, EVEN_K=True)
    sass, regs = compile_sm90(Q._qgemm_kernel, sig, consts, ("N", "K", "Kw", "stride_xm", "stride_w", "stride_ym"),
                              warps, stages)
    print(describe(f"qgemm {tile}", sass, regs))
    psig = {n: ptr.get(n, "i32" if n in ints else "constexpr") for n in _permuted_kernel.arg_names}
    for permuted in (False, True):
        sass, regs = compile_sm90(_permuted_kernel, psig, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, PERMUTED=permuted),
                                  ("N", "K", "stride_xm", "stride_w", "stride_ym"), warps, stages)
        print(describe(f"prototype, {'permuted' if permuted else 'row-major'} {tile}", sass, regs))

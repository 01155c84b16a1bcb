"""Kernels under programmatic dependent launch, compiled for Hopper (PTX, no GPU needed), in a
fresh process, since the test session runs Triton interpreted: the TMA GEMVs (HEAD_START) request
weight tiles before the PDL wait, inputs never; the fused RoPE-and-decode attention kernel reads its
first tile of cached keys and values before the wait; the step's small kernels let the next kernel
launch before they wait (USE_PDL = 2, fastllm.kernels.launch.TRIGGER_FIRST), or after (True)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

COMPILE = r"""
import json, re, sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.backends.nvidia import compiler  # noqa: F401
except Exception as e:  # no CUDA backend in this Triton
    print(json.dumps({"skip": repr(e)})); sys.exit(0)
from fastllm.kernels.gemv_bytes import _gemv_bytes_tma_kernel
from fastllm.kernels.gemv_int4 import _gemv_int4_tma_kernel
from fastllm.kernels.fused import _rms_norm_kernel
from fastllm.kernels.paged_attention import _decode_merge_kernel, _decode_rope_split_kernel, _decode_split_kernel


def ptx(fn, sig, cons, warps, stages=1):
    sig = dict(sig, **{k: "constexpr" for k in cons})
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig)
             if sig[n].startswith("*") or n in ("N", "K", "Kp") or n.startswith("stride")}
    src = ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs)
    opts = dict(num_warps=warps, num_stages=stages)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]


def kinds_of(text):
    kinds = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("griddepcontrol.wait"):
            kinds.append("wait")
        elif line.startswith("griddepcontrol.launch_dependents"):
            kinds.append("launch")
        elif "cp.async.bulk.tensor" in line:
            kinds.append("tma")
        elif re.search(r"\bld\.global\.v4\b", line):
            kinds.append("load16")  # a 16-byte vector load
        elif re.search(r"\bcp\.async\.c[ag]\b|\bld\.global\b", line):
            kinds.append("load")
    return kinds


out = {}
for head in (0, 1, 2):
    int8 = ptx(_gemv_bytes_tma_kernel, {"x_ptr": "*bf16", "w_desc": "tensordesc<i32[8, 64]>", "b_ptr": "*bf16",
                                        "y_ptr": "*bf16", "scale_ptr": "*fp32", "N": "i32", "K": "i32"},
               dict(HAS_BIAS=False, SILU_MUL=False, FP8=False, ASM=True, BLOCK_N=8, BLOCK_K=256, STAGES=3,
                    USE_PDL=True, HEAD_START=head), 1)
    int4 = ptx(_gemv_int4_tma_kernel, {"x_ptr": "*bf16", "w_desc": "tensordesc<i32[32, 64]>",
                                       "sz_desc": "tensordesc<fp32[32, 8]>", "b_ptr": "*bf16", "y_ptr": "*bf16",
                                       "N": "i32", "K": "i32", "Kp": "i32"},
               dict(G=128, HAS_BIAS=False, ASM=True, BLOCK_N=32, BLOCK_W=64, STAGES=3, USE_PDL=True, DP4A=True,
                    HEAD_START=head, SILU_MUL=False), 2)
    for name, text in (("int8", int8), ("int4", int4)):
        out[f"{name} head={head}"] = [k.replace("load16", "load") for k in kinds_of(text)]
strides = ["stride_qb", "stride_qh", "stride_vb", "stride_vh", "stride_cb", "stride_cr", "stride_ch", "stride_bt",
           "stride_sb", "stride_sh", "stride_ss"]
cache = {"k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32"}
for use in (True, 2):
    attn = ptx(_decode_rope_split_kernel,
               {"qk_ptr": "*bf16", "v_ptr": "*bf16", **cache, "slot_ptr": "*i64", "pos_ptr": "*i64",
                "inv_freq_ptr": "*fp32", "rope_scale": "fp32", "scratch_ptr": "*fp32", "qk_scale": "fp32",
                "num_splits": "i32", **{n: "i32" for n in strides}},
               dict(NUM_HEADS=32, GROUP=1, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_R=1, BLOCK_G=16, BLOCK_HALF=64,
                    BLOCK_N=32, DOT_PRECISION="tf32", UPCAST_DOT=False, USE_PDL=use), 4, 2)
    out[f"decode_rope {use}"] = kinds_of(attn)
    split = ptx(_decode_split_kernel,
                {"q_ptr": "*bf16", **cache, "scratch_ptr": "*fp32", "qk_scale": "fp32", "num_splits": "i32",
                 **{n: "i32" for n in ("stride_qb", "stride_qh", "stride_cb", "stride_cr", "stride_ch", "stride_bt",
                                       "stride_sb", "stride_sh", "stride_ss")}},
                dict(GROUP=1, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_G=16, BLOCK_D=128, BLOCK_N=32,
                     DOT_PRECISION="tf32", UPCAST_DOT=False, USE_PDL=use), 4, 2)
    merge = ptx(_decode_merge_kernel,
                {"scratch_ptr": "*fp32", "out_ptr": "*bf16", "num_splits": "i32",
                 **{n: "i32" for n in ("stride_sb", "stride_sh", "stride_ss", "stride_ob", "stride_oh")}},
                dict(HEAD_DIM=128, BLOCK_S=16, BLOCK_D=128, USE_PDL=use), 4)
    norm = ptx(_rms_norm_kernel,
               {"x_ptr": "*bf16", "res_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "stride_x": "i32",
                "stride_r": "i32", "stride_o": "i32", "N": "i32", "eps": "fp32"},
               dict(HAS_RES=True, BLOCK=4096, USE_PDL=use), 4)
    for name, text in (("decode_split", split), ("decode_merge", merge), ("rms_norm", norm)):
        out[f"{name} {use}"] = kinds_of(text)
out["decode_rope"] = out["decode_rope True"]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def order():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in out:
        pytest.skip(f"Triton cannot compile for CUDA here: {out['skip']}")
    return out


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("kernel", ["int8", "int4"])
def test_head_start_requests_weights_before_the_wait_and_inputs_after_it(order, kernel, depth):
    kinds = order[f"{kernel} head={depth}"]
    first_wait = kinds.index("wait")
    assert "tma" in kinds[:first_wait]  # a weight tile is on its way before the kernel waits
    assert "load" in kinds and "load" not in kinds[:first_wait]  # no other global read before it


@pytest.mark.parametrize("kernel", ["int8", "int4"])
def test_depth_two_requests_more_before_the_wait(order, kernel):
    before = {d: order[f"{kernel} head={d}"].index("wait") for d in (1, 2)}
    assert before[2] > before[1]


@pytest.mark.parametrize("kernel", ["int8", "int4"])
def test_without_head_start_every_load_follows_the_wait(order, kernel):
    kinds = order[f"{kernel} head=0"]
    assert kinds[0] == "wait" and {"tma", "load"} <= set(kinds)


def test_fused_decode_attention_reads_the_cache_before_the_wait(order):
    # Llama-2-7B heads (128 dims, bf16), 32 keys a tile, 4 warps: k and v halves of 32 keys are
    # 4 x 4 KiB, 2 x 16 bytes per thread each. All eight 16-byte reads of the cache come before
    # the wait; q and this step's k and v (from the kernel before) after it.
    kinds = order["decode_rope"]
    first_wait = kinds.index("wait")
    assert kinds[:first_wait].count("load16") >= 8
    assert {"load", "load16"} & set(kinds[first_wait + 1:])


@pytest.mark.parametrize("kernel", ["decode_rope", "decode_split", "decode_merge", "rms_norm"])
def test_small_kernels_let_the_next_launch_before_they_wait_only_when_asked(order, kernel):
    first = [k for k in order[f"{kernel} 2"] if k in ("wait", "launch")]
    after = [k for k in order[f"{kernel} True"] if k in ("wait", "launch")]
    assert first == ["launch", "wait"]  # USE_PDL = 2: once each, the launch first
    assert after == ["wait", "launch"]


@pytest.mark.parametrize("use", ["True", "2"])
def test_the_rms_norm_reads_its_weight_before_the_wait(order, use):
    kinds = order[f"rms_norm {use}"]
    assert any(k.startswith("load") for k in kinds[:kinds.index("wait")])  # the weight
    assert any(k.startswith("load") for k in kinds[kinds.index("wait") + 1:])  # x and the residual

"""Kernels that live in the GPU scripts (scripts/), checked against float64 on odd shapes: the
persistent GEMV chain of scripts/chain_gpu.py, run as one program (Triton's interpreter runs
programs one after another, so a grid barrier across several would never open)."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _chain_module():
    path = Path(__file__).parents[2] / "scripts" / "chain_gpu.py"
    spec = importlib.util.spec_from_file_location("chain_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["chain_gpu"] = mod  # Triton resolves the kernel's helpers through the module
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("ahead", [1, 2])
def test_chain_gpu_persistent_chain_matches_float64(ahead):
    """Two layers of qkv -> o -> gate_up -> down (each input the first K outputs of the stage
    before), with a K tail in down_proj that does not fill its tile. The barrier's counters end
    reset, its generation counted."""
    from fastllm.stages.quantizers.int8 import quantize_int8

    chain = CHAIN
    torch.manual_seed(0)
    H, I, L = 64, 96, 2
    shapes = {"qkv": (192, H), "o": (H, H), "gate_up": (2 * I, H), "down": (H, I)}
    qs = {}
    for name, (N, K) in shapes.items():
        q = torch.empty(L, N, K, dtype=torch.int8, device=DEV)
        s = torch.empty(L, N, device=DEV)
        for i in range(L):
            q[i], s[i] = quantize_int8(torch.randn(N, K, device=DEV))
        qs[name] = (q, s / K ** 0.5)
    ys = [torch.zeros(N, dtype=torch.bfloat16, device=DEV) for N, _ in shapes.values()]
    x = torch.randn(H, dtype=torch.bfloat16, device=DEV)
    ys[3][:H].copy_(x)
    bar = torch.zeros(4, dtype=torch.int32, device=DEV)
    w = [t for name in shapes for t in (qs[name][0].view(torch.int32), qs[name][1])]
    chain._chain_kernel[(1,)](*ys, *w, bar, 0, L, QN=192, ON=H, GN=2 * I, DN=H, H=H, I=I, BLOCK_N=8, BLOCK_K=32,
                              BLOCK_KD=64, ASM=torch.cuda.is_available(), USE_PDL=False, LIMIT=10, AHEAD=ahead)
    # the last layer's o, gate_up and down, each from the kernel's own (bf16) input: one rounding
    for j, name in enumerate(["o", "gate_up", "down"]):
        q, s = qs[name]
        K = shapes[name][1]
        ref = (q[L - 1].double() @ ys[j][:K].double()) * s[L - 1].double()
        assert ((ys[j + 1].double() - ref).norm() / ref.norm()).item() < 5e-3, name
    # and the whole chain from x, where the roundings compound
    y = x.double()
    for i in range(L):
        for name, (N, K) in shapes.items():
            q, s = qs[name]
            y = ((q[i].double() @ y[:K]) * s[i].double()).to(torch.bfloat16).double()
    assert ((ys[3].double() - y).norm() / y.norm()).item() < 5e-2
    assert bar.tolist() == [0, 4 * L - 1, 0, 0]  # arrivals reset, one generation per barrier, none gave up


CHAIN = _chain_module()


@triton.jit
def _owners(out_ptr, NB, INTERLEAVE: tl.constexpr):
    """Counts, per row block, the programs whose share (chain_gpu._share) holds it."""
    pid = tl.program_id(0)
    b0, step, nb = CHAIN._share(pid, tl.num_programs(0), NB, INTERLEAVE)
    for j in range(nb):
        tl.atomic_add(out_ptr + b0 + j * step, 1)


def test_chain_gpu_shares_cover_every_block_once():
    """Contiguous and interleaved shares of NB row blocks over P programs (some with none):
    every block belongs to exactly one program."""
    for P, NB in [(1, 5), (4, 17), (6, 4), (7, 49)]:
        for interleave in (False, True):
            out = torch.zeros(NB, dtype=torch.int32, device=DEV)
            _owners[(P,)](out, NB, INTERLEAVE=interleave)
            assert out.tolist() == [1] * NB, (P, NB, interleave)

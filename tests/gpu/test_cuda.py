"""The same engine on CUDA: parity with the CPU, on-device sampling, and close() freeing memory.
Skipped where CUDA is missing (CI has no GPU)."""
from __future__ import annotations

import gc

import pytest
import torch

from fastllm import Engine, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from helpers import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("gpu"), "llama", num_key_value_heads=2)


def test_cuda_fp32_logits_equal_cpu(tiny_dir):
    ids = torch.randint(0, 300, (29,)).tolist()
    with Engine(str(tiny_dir), device="cpu", dtype="float32", progress=False) as cpu:
        ref = cpu.prompt_logits(ids)
    with Engine(str(tiny_dir), device="cuda", dtype="float32", progress=False) as gpu:
        got = gpu.prompt_logits(ids).cpu()
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def test_cuda_bf16_greedy_and_seeded_sampling(tiny_dir):
    prompts = [{"prompt_token_ids": torch.randint(0, 300, (n,)).tolist()} for n in (3, 17, 40)]
    with Engine(str(tiny_dir), device="cuda", progress=False) as eng:
        assert eng.dtype == torch.bfloat16  # the default on CUDA
        greedy = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
        assert all(len(o.token_ids) == 10 for o in greedy)
        p = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3, max_tokens=10, ignore_eos=True)
        a = eng.generate(prompts, p)
        b = eng.generate(prompts[::-1], p)[::-1]
        assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_dummy_shape_runs_on_cuda():
    with Engine("dummy:qwen2.5-0.5b", progress=False) as eng:
        outs = eng.generate([{"prompt_token_ids": list(range(1, 50))}] * 4,
                            SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        assert all(len(o.token_ids) == 16 for o in outs)


def test_close_gives_back_device_memory():
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    eng = Engine("dummy:smollm2-135m", progress=False)
    eng.generate({"prompt_token_ids": list(range(1, 100))}, SamplingParams(max_tokens=8))
    assert torch.cuda.memory_allocated() > before + 100 * 2 ** 20  # the weights were there
    eng.close()
    gc.collect()
    assert torch.cuda.memory_allocated() <= before + 2 ** 20
    # and a second model loads in the same process
    with Engine("dummy:smollm2-135m", progress=False) as again:
        assert again.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2))[0].token_ids


def test_cuda_graphs_and_continuous_match_eager_static(tiny_dir):
    g = torch.Generator().manual_seed(5)
    prompts = [{"prompt_token_ids": torch.randint(0, 300, (n,), generator=g).tolist()} for n in (1, 9, 33, 70, 4)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    runs = {}
    for name, opts in {"graphs": {}, "eager": {"cuda_graphs": False}, "sync": {"async_scheduling": False},
                       "static": {"attention": "sdpa", "batcher": "static"}}.items():
        with Engine(str(tiny_dir), device="cuda", dtype="float32", progress=False, **opts) as eng:
            runs[name] = [o.token_ids for o in eng.generate(prompts, sp)]
            if name == "graphs":
                assert eng.runner.graphs is not None and eng.runner.graphs.graphs
    assert runs["graphs"] == runs["eager"] == runs["sync"] == runs["static"]


def test_batch_one_decode_through_the_fused_gemv_matches_cublas(tiny_dir, monkeypatch):
    from fastllm.core.cuda_linear import DecodeLinear

    prompt = {"prompt_token_ids": torch.randint(0, 300, (21,)).tolist()}
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    runs = {}
    for name, devices in {"default": ("cuda",), "cublas": ()}.items():  # (): DecodeLinear falls back to F.linear
        monkeypatch.setattr(DecodeLinear, "devices", devices)
        with Engine(str(tiny_dir), device="cuda", dtype="float32", progress=False) as eng:
            runs[name] = eng.generate(prompt, sp)[0].token_ids
            assert isinstance(eng.runner.model.model.layers[0].mlp.down_proj, DecodeLinear)
    assert runs["default"] == runs["cublas"]


def test_int8_decode_through_the_cuda_gemv_matches_the_triton_one(tiny_dir, monkeypatch):
    """A bf16 engine with int8 weights decodes at batch 1 (CUDA graphs, PDL) through the CUDA int8
    GEMV where it builds (with and without the RMSNorms in it, with and without SiLU-and-mul in
    gate_up_proj's GEMV), and through the Triton word GEMV without it: the same greedy tokens."""
    from fastllm.kernels import cuda_gemv, gemv
    from fastllm.stages.quantizers import RowScaledLinear

    prompt = {"prompt_token_ids": torch.randint(0, 300, (21,), generator=torch.Generator().manual_seed(7)).tolist()}
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    glu_calls = []
    forward_glu = RowScaledLinear.forward_glu
    monkeypatch.setattr(RowScaledLinear, "forward_glu", lambda self, x: glu_calls.append(x.shape) or forward_glu(self, x))
    runs = {}
    for use_cuda, norm, glu in ((True, False, True), (True, False, False), (True, True, False), (False, False, False)):
        monkeypatch.setattr(gemv, "CUDA", use_cuda)
        monkeypatch.setattr(gemv, "CUDA_NORM", norm)
        monkeypatch.setattr(gemv, "GLU", glu)
        with Engine(str(tiny_dir), device="cuda", dtype="bfloat16", quantizer="int8", progress=False) as eng:
            runs[use_cuda, norm, glu] = eng.generate(prompt, sp)[0].token_ids
        if (use_cuda, norm, glu) == (True, False, True):
            took_glu = len(glu_calls)
    if not cuda_gemv.available(torch.zeros(16, dtype=torch.bfloat16, device="cuda")):
        pytest.skip("the CUDA GEMV does not build here")
    assert took_glu > 0 and len(glu_calls) == took_glu  # the GLU path ran, and only where on
    assert runs[True, False, True] == runs[True, False, False] == runs[True, True, False] == runs[False, False, False]

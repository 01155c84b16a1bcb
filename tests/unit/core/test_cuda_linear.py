"""DecodeLinear: at one token the model's linears run fastllm's GEMV with the RMSNorm (and
residual add) or SiLU-and-mul before them fused in; greedy decoding must not change. Run on
the CPU through Triton's interpreter."""
from __future__ import annotations

import random

import pytest

pytest.importorskip("triton")

from fastllm import Engine, SamplingParams  # noqa: E402
from fastllm.core import cuda_linear  # noqa: E402
from fastllm.kernels import gemv as gemv_module  # noqa: E402
from helpers import hf_greedy, load_hf, make_tiny_model  # noqa: E402


@pytest.mark.parametrize("family, fuse_norm", [("llama", True), ("qwen2", True), ("qwen3", True), ("llama", False)])
def test_one_token_steps_through_the_fused_gemv_keep_greedy_outputs(tmp_path, monkeypatch, family, fuse_norm):
    model_dir = make_tiny_model(tmp_path, family)
    monkeypatch.setattr("fastllm.engine.cpu.can_pack", lambda: False)
    monkeypatch.setattr(cuda_linear.DecodeLinear, "devices", ("cuda", "cpu"))
    monkeypatch.setattr(cuda_linear.DecodeLinear, "fuse_norm", fuse_norm)
    calls = []
    real = gemv_module.gemv

    def counting(x, w, bias=None, **kw):
        calls.append(("norm" if kw.get("norm_weight") is not None else "silu" if kw.get("silu_mul") else "plain",
                      kw.get("residual") is not None))
        return real(x, w, bias, config=gemv_module.CONFIGS[1], **kw)  # the autotuner times on a GPU

    monkeypatch.setattr(gemv_module, "gemv", counting)
    rng = random.Random(0)
    prompt = [rng.randrange(300) for _ in range(9)]
    with Engine(str(model_dir), device="cpu", dtype="float32", progress=False, attention="paged",
                batcher="continuous") as e:
        cuda_linear.use_gemv(e.runner.model)
        out = e.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert out[0].token_ids == hf_greedy(load_hf(model_dir), prompt, 6)
    layers = len(load_hf(model_dir).model.layers)
    steps = 5  # decode steps of one token; the prompt's prefill takes cuBLAS' path
    normed = 2 * layers * steps  # qkv and gate_up: through the norm GEMV, or a norm kernel and the plain one
    assert calls.count(("norm", False)) == (steps if fuse_norm else 0)  # the first input norm has no residual
    assert calls.count(("norm", True)) == (normed - steps if fuse_norm else 0)
    assert calls.count(("silu", False)) == steps * layers
    # o_proj; the LM head at every sample
    assert calls.count(("plain", False)) == steps * layers + steps + 1 + (0 if fuse_norm else normed)

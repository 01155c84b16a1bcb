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


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_one_token_steps_through_the_fused_gemv_keep_greedy_outputs(tmp_path, monkeypatch, family):
    model_dir = make_tiny_model(tmp_path, family)
    monkeypatch.setattr("fastllm.engine.cpu.can_pack", lambda: False)
    monkeypatch.setattr(cuda_linear.DecodeLinear, "devices", ("cuda", "cpu"))
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
    assert calls.count(("norm", False)) == steps  # the first layer's input norm has no residual yet
    assert calls.count(("norm", True)) == steps * (2 * layers - 1)
    assert calls.count(("silu", False)) == steps * layers
    assert calls.count(("plain", False)) == steps * layers + steps + 1  # o_proj; the LM head at every sample

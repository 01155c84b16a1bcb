"""`fastllm quantize`: a quantized model saved once loads with the same weights, no re-quantizing."""
from __future__ import annotations

import json

import pytest
import torch

from fastllm import Engine
from fastllm.cli import main
from fastllm.errors import CheckpointError
from fastllm.stages.quantizers.int4 import Int4Linear
from fastllm.stages.quantizers.int8 import Int8Linear

OPTS = dict(dtype="float32", device="cpu", progress=False)
IDS = [504, 3575, 282, 4649, 314, 7042, 30, 378, 1030, 4561, 314]


@pytest.mark.parametrize("spec, cls", [
    ({"name": "int8"}, Int8Linear),
    ({"name": "int8", "activations": "dynamic", "smooth": 0.8, "calibration_tokens": 64}, Int8Linear),
    ({"name": "int4", "group_size": 64, "activation_aware": True, "calibration_tokens": 64}, Int4Linear)])
def test_saved_quantized_model_loads_the_same_weights(smollm2_dir, tmp_path, spec, cls):
    out = tmp_path / "q"
    assert main(["quantize", str(out), "--quantizer", json.dumps(spec), "--dtype", "float32", "--device", "cpu"]) == 0
    assert json.loads((out / "fastllm_quantization.json").read_text())["quantizer"] == spec
    with Engine(**OPTS, quantizer=spec) as fresh:
        want = fresh.prompt_logits(IDS)
    with Engine(str(out), **OPTS) as saved:  # quantizer "none": the layers come from the file
        layer = saved.runner.model.model.layers[0].mlp.down_proj
        assert isinstance(layer, cls)
        got = saved.prompt_logits(IDS)
        assert saved.tokenizer is not None
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_quantize_needs_a_quantizer(capsys, smollm2_dir, tmp_path):
    assert main(["quantize", str(tmp_path / "q")]) == 2
    assert "needs --quantizer" in capsys.readouterr().err


def test_an_unknown_format_is_refused(smollm2_dir, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(out), "--quantizer", "int8", "--dtype", "float32", "--device", "cpu"]) == 0
    (out / "fastllm_quantization.json").write_text(json.dumps({"format": 99, "quantizer": {"name": "int8"}}))
    with pytest.raises(CheckpointError, match="format 99"):
        Engine(str(out), **OPTS)

"""Knowledge distillation: the student's construction, a short run on the real model (loss,
checkpoints, resuming to the very same weights), the saved student in Engine, and the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from fastllm import Engine, SamplingParams
from fastllm.distill import build_student, distill, pick_layers
from fastllm.errors import ConfigError

TINY = dict(layers=2, seq_len=16, batch_size=2, steps=6, checkpoint_every=3, lr=1e-3, warmup_steps=2,
            eval_tokens=512, progress=False, device="cpu")


def test_pick_layers_spreads_over_the_depth():
    assert pick_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert pick_layers(30, 1) == [0] and pick_layers(4, 4) == [0, 1, 2, 3]
    assert pick_layers(30, [3, 1]) == [3, 1]
    for bad in (0, 31, [30], [1, 1], []):
        with pytest.raises(ConfigError):
            pick_layers(30, bad)


def test_a_full_depth_student_is_the_teacher_and_a_narrow_one_keeps_the_interface(smollm2_dir):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    x = torch.tensor([[504, 3575, 282, 4649, 314]])
    same = build_student(teacher, teacher.config.num_hidden_layers).eval()
    torch.testing.assert_close(same(x).logits, teacher(x).logits, rtol=0, atol=0)
    small = build_student(teacher, [0, 29], intermediate_size=256).eval()
    assert small.config.num_hidden_layers == 2 and small.model.layers[1].mlp.down_proj.weight.shape[1] == 256
    assert small(x).logits.shape == teacher(x).logits.shape
    assert teacher.config.num_hidden_layers == 30  # the teacher is untouched


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_distill_checkpoints_and_resumes_to_the_same_weights(smollm2_dir, tmp_path):
    whole = distill(str(tmp_path / "a"), str(smollm2_dir), **TINY)
    assert whole.steps == 6 and whole.stopped == "steps" and len(whole.losses) == 2
    assert (tmp_path / "a" / "checkpoint" / "optimizer.safetensors").exists()
    cut = distill(str(tmp_path / "b"), str(smollm2_dir), **TINY, max_seconds=0)  # stops after one step
    assert cut.steps == 1 and cut.stopped == "time"
    rest = distill(str(tmp_path / "b"), str(smollm2_dir), **TINY)
    assert rest.steps == 6
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with Engine(str(tmp_path / "a"), device="cpu", dtype="float32", progress=False) as e:
        out = e.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].token_ids) == 4
    meta = json.loads((tmp_path / "a" / "fastllm_distillation.json").read_text())
    assert meta["layers"] == [0, 29] and meta["steps"] == 6


def test_distillation_lowers_the_loss(smollm2_dir, tmp_path):
    res = distill(str(tmp_path / "s"), str(smollm2_dir), **(TINY | dict(steps=12, checkpoint_every=4)))
    assert res.losses[-1] < res.losses[0], res.losses


def test_bad_options_are_config_errors(smollm2_dir, tmp_path):
    with pytest.raises(ConfigError, match="seq_len"):
        distill(str(tmp_path / "x"), str(smollm2_dir), seq_len=1)
    with pytest.raises(ConfigError, match="alpha"):
        distill(str(tmp_path / "x"), str(smollm2_dir), alpha=2.0)
    with pytest.raises(ConfigError, match="neither a GGUF file nor an HF model directory"):
        distill(str(tmp_path / "x"), str(tmp_path / "nothing"))


def test_cli_reports_perplexity_before_and_after(smollm2_dir, tmp_path, capsys):
    from fastllm.cli import main

    report = tmp_path / "r.json"
    assert main(["distill", str(tmp_path / "s"), "--teacher", str(smollm2_dir), "--layers", "2", "--steps", "3",
                 "--seq-len", "16", "--batch-size", "2", "--eval-tokens", "64", "--device", "cpu",
                 "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["steps"] == 3
    assert {"perplexity teacher", "perplexity student before", "perplexity student after"} <= r.keys()
    assert r["perplexity teacher"] < r["perplexity student before"]
    assert "perplexity student after" in capsys.readouterr().out

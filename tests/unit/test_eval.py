"""fastllm.eval.perplexity and `fastllm eval perplexity` on the real default model (CPU)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fastllm.errors import InvalidRequestError
from fastllm.eval import default_text, perplexity
from helpers import hf_logits

TEXT = ("The paged KV cache hands out memory a block at a time, so a sequence holds only what it uses. "
        "Continuous batching admits a new request as soon as another finishes. ") * 6


def test_default_text_is_pythons_own():
    text, where = default_text()
    assert where.endswith("topics.py") and len(text) > 100_000


def test_perplexity_equals_hf_on_the_same_windows(smollm2_engine, smollm2_hf):
    res = perplexity(smollm2_engine, TEXT, context=64, max_tokens=None, source="TEXT")
    ids = smollm2_engine.tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    for s in range(0, len(ids), 64):
        w = ids[s:s + 64]
        if len(w) < 2:
            break
        nll += torch.nn.functional.cross_entropy(hf_logits(smollm2_hf, w)[:-1].double(), torch.tensor(w[1:]),
                                                 reduction="sum").item()
        n += len(w) - 1
    assert res.num_tokens == n and res.num_windows == math.ceil(len(ids) / 64) - (len(ids) % 64 == 1)
    assert res.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert 1 < res.perplexity < 50  # repeated English text: well predicted, not degenerate
    assert res.source == "TEXT" and res.context == 64


def test_more_context_predicts_better(smollm2_engine):
    short = perplexity(smollm2_engine, TEXT, context=16, max_tokens=None)
    long = perplexity(smollm2_engine, TEXT, context=128, max_tokens=None)
    assert long.perplexity < short.perplexity  # the text repeats itself: context helps


@pytest.mark.parametrize("kwargs, match", [({"context": 1}, "context must be"), ({"context": 10 ** 7}, "context must be"),
                                          ({"text": "hi"}, "at least 2"), ({"text": ""}, "at least 2")])
def test_bad_arguments_are_typed_errors(smollm2_engine, kwargs, match):
    kwargs = {"text": TEXT} | kwargs
    with pytest.raises(InvalidRequestError, match=match):
        perplexity(smollm2_engine, **kwargs)


def test_cli_eval_perplexity_writes_json(smollm2_dir, tmp_path, capsys):
    from fastllm.cli import main

    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--file", str(f), "--context", "64", "--max-tokens", "100",
                 "--dtype", "float32", "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_tokens"] == 63 + 35 and res["num_windows"] == 2  # 100 tokens: windows of 64 and 36 and res["perplexity"] > 1
    assert res["source"] == str(f) and res["options"]["dtype"] == "float32"
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", "perplexity", "--file", str(tmp_path / "missing.txt")]) == 2

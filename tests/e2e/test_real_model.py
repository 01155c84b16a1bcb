"""The embedded default model, SmolLM2-135M-Instruct (real weights, CPU, fp32), against HF
transformers loading the same converted checkpoint."""
from __future__ import annotations

import pytest

from fastllm import SamplingParams
from helpers import assert_logits_close, hf_greedy, hf_logits

pytestmark = pytest.mark.slow
FRANCE = "The capital of France is"


def paragraph(max_chars: int = 1500) -> str:
    """Real English prose from the Python docs installed with the interpreter (read at runtime)."""
    from pydoc_data.topics import topics

    return topics["assert"][:max_chars]


@pytest.mark.parametrize("text", [FRANCE, "paragraph"])
def test_prompt_logits_match_hf(smollm2_engine, smollm2_hf, text):
    text = paragraph() if text == "paragraph" else text
    ids = smollm2_engine.tokenizer.encode(text)
    assert len(ids) > 4
    assert_logits_close(smollm2_engine.prompt_logits(ids), hf_logits(smollm2_hf, ids))


def test_greedy_20_tokens_match_hf(smollm2_engine, smollm2_hf):
    ids = smollm2_engine.tokenizer.encode(FRANCE)
    out = smollm2_engine.generate({"prompt_token_ids": ids},
                                  SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert out.token_ids == hf_greedy(smollm2_hf, ids, 20)


def test_greedy_batch_matches_hf(smollm2_engine, smollm2_hf):
    prompts = [FRANCE, paragraph(400), "def fibonacci(n):"]
    outs = smollm2_engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(smollm2_hf, smollm2_engine.tokenizer.encode(prompt), 8), prompt


def test_knows_the_capital_of_france(smollm2_engine):
    out = smollm2_engine.generate(FRANCE, SamplingParams(temperature=0, max_tokens=8))[0]
    assert "Paris" in out.text
    assert out.text == smollm2_engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_chat_template(smollm2_engine):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert "<|im_start|>assistant" in smollm2_engine.render_chat(messages)
    out = smollm2_engine.chat(messages, SamplingParams(temperature=0, max_tokens=20))
    assert "Paris" in out.text

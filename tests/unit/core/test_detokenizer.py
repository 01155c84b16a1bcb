"""Incremental detokenization equals a whole decode, and stop strings are held back and cut."""
from __future__ import annotations

import pytest

from fastllm.core.detokenizer import Detokenizer


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.mark.parametrize("text", ["Héllo wörld — naïve café 日本語 🙂 done", "  spaced\n\tout  ", "plain"])
def test_incremental_equals_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    d = Detokenizer(tok, tok.encode("Prompt:", add_special_tokens=False), stop=[])
    pieces = []
    for i in ids:
        assert not d.add(i)
        pieces.append(d.delta(final=False))
    pieces.append(d.delta(final=True))
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)


def test_stop_string_is_cut_and_never_streamed(tok):
    ids = tok.encode("alpha beta STOP gamma", add_special_tokens=False)
    d = Detokenizer(tok, [], stop=["STOP", "zzz"])
    streamed = ""
    for i in ids:
        hit = d.add(i)
        streamed += d.delta(final=hit)
        if hit:
            break
    assert hit and streamed == "alpha beta " and "STOP" not in streamed

"""Sampler against simple references: greedy, top-k/top-p/min-p support, penalties, seeds."""
from __future__ import annotations

import torch

from fastllm.core.request import Request
from fastllm.core.sampler import Sampler
from fastllm.sampling import SamplingParams


def req(params: SamplingParams, prompt=(1, 2, 3), output=()) -> Request:
    r = Request("r", None, list(prompt), params, sink=lambda _: None, max_len=1000)
    r.token_ids.extend(output)
    if params.seed is not None:
        r.generator = torch.Generator().manual_seed(params.seed)
    return r


def draw(logits: torch.Tensor, params: SamplingParams, n: int = 2000) -> torch.Tensor:
    s = Sampler(torch.device("cpu"), seed=0)
    reqs = [req(params) for _ in range(n)]
    return s(logits.expand(n, -1).clone(), reqs)


def test_greedy_is_argmax():
    logits = torch.randn(5, 37)
    reqs = [req(SamplingParams(temperature=0)) for _ in range(5)]
    assert torch.equal(Sampler(torch.device("cpu"))(logits, reqs), logits.argmax(-1))


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    got = torch.bincount(draw(logits, SamplingParams(temperature=1.0), 6000), minlength=3) / 6000
    assert torch.allclose(got, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_top_k_top_p_min_p_restrict_support():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    assert set(draw(logits, SamplingParams(top_k=2)).tolist()) == {0, 1}
    assert set(draw(logits, SamplingParams(top_p=0.7)).tolist()) == {0, 1}
    assert set(draw(logits, SamplingParams(top_p=0.71)).tolist()) == {0, 1, 2}
    assert set(draw(logits, SamplingParams(min_p=0.3)).tolist()) == {0, 1, 2}  # >= 0.12
    assert set(draw(logits, SamplingParams(top_k=3, min_p=0.5)).tolist()) == {0, 1}


def test_penalties_match_reference():
    V = 11
    logits = torch.randn(1, V) * 3
    p = SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    r = req(p, prompt=(1, 2), output=(2, 5, 5))
    s = Sampler(torch.device("cpu"))
    got = s._penalize(logits.clone(), [r])
    ref = logits.clone()[0]
    for t in {1, 2, 5}:
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    counts = {2: 1, 5: 2}
    for t, c in counts.items():
        ref[t] -= 0.25 * c + 0.5
    assert torch.allclose(got[0], ref, atol=1e-6)


def test_seeded_rows_do_not_depend_on_neighbours():
    logits = torch.randn(1, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = Sampler(torch.device("cpu"), seed=1)(logits.clone(), [req(p)])
    mixed = Sampler(torch.device("cpu"), seed=2)(
        torch.cat([torch.randn(2, 50), logits]), [req(SamplingParams()), req(SamplingParams()), req(p)])
    assert alone.item() == mixed[2].item()

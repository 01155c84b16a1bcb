"""async_scheduling: step N+1 is scheduled and launched before step N's sampled ids reach the
host. Outputs must equal the synchronous engine's under every way a request can end (length,
stop token, abort, a failing step) and with every sampler feature, and no KV may leak."""
from __future__ import annotations

import random

import pytest

from fastllm import Engine, SamplingParams
from fastllm.core.request import PENDING
from fastllm.errors import EngineStepError
from helpers import make_tiny_model

OPTS = dict(dtype="float32", device="cpu", progress=False, batcher="continuous",
            attention={"name": "paged", "block_size": 8}, max_num_batched_tokens=48)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("overlap"), "llama")


def _prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(300) for _ in range(rng.randint(1, 70))]} for _ in range(n)]


def _run(model_dir, prompts, params, overlap: bool, calls: list | None = None):
    with Engine(str(model_dir), async_scheduling=overlap, **OPTS) as e:
        if calls is not None:
            run = e.runner.run
            e.runner.run = lambda batch, rows, pending=None: (calls.append(pending is not None),
                                                             run(batch, rows, pending))[1]
        outs = e.generate(prompts, params)
        pool = e.attention.pool
        assert not e.batcher.has_work() and sum(pool.ref) == 0 and not pool.tables
    return [(o.token_ids, o.finish_reason, o.text) for o in outs]


def test_overlap_equals_sync_for_every_sampler_and_stop(tiny_llama):
    prompts = _prompts(12)
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = _run(tiny_llama, prompts, free, overlap=False)
    params = []
    for i, (ids, _, _) in enumerate(ref):
        kind = i % 6
        if kind == 0:  # stops on a token it would emit mid-way
            params.append(SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[ids[4]]))
        elif kind == 1:
            params.append(SamplingParams(temperature=0, max_tokens=1 + i % 3, ignore_eos=True))
        elif kind == 2:  # seeded sampling with filters
            params.append(SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=i, max_tokens=9, ignore_eos=True))
        elif kind == 3:  # penalties read past outputs: that request's steps run without overlap
            params.append(SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5,
                                         max_tokens=10, ignore_eos=True))
        elif kind == 4:
            params.append(SamplingParams(temperature=1.0, min_p=0.05, seed=100 + i, max_tokens=7, ignore_eos=True))
        else:
            params.append(free)
    calls: list[bool] = []
    sync = _run(tiny_llama, prompts, params, overlap=False)
    ovl = _run(tiny_llama, prompts, params, overlap=True, calls=calls)
    assert ovl == sync
    assert any(calls), "no step was fed a token still on the device: nothing overlapped"
    for (ids, reason, _), p in zip(ovl, params):
        assert PENDING not in ids and 1 <= len(ids) <= p.max_tokens
        if p.stop_token_ids:
            assert reason == "stop" and ids[-1] in p.stop_token_ids


def test_overlap_stream_equals_generate(tiny_llama):
    prompt = _prompts(1, seed=3)[0]
    sp = SamplingParams(temperature=0, max_tokens=15, ignore_eos=True)
    with Engine(str(tiny_llama), async_scheduling=True, **OPTS) as e:
        chunks = list(e.stream(prompt, sp))
        out = e.generate(prompt, sp)[0]
    assert [t for c in chunks for t in c.token_ids] == out.token_ids
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])


def test_a_step_failing_with_a_token_in_flight_fails_its_requests_and_the_engine_serves_on(tiny_llama):
    prompts = _prompts(4, seed=5)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with Engine(str(tiny_llama), async_scheduling=True, **OPTS) as e:
        expected = [o.token_ids for o in e.generate(prompts, sp)]
        run, n = e.runner.run, [0]

        def flaky(batch, rows, pending=None):
            n[0] += 1
            if n[0] == 4:  # a decode step: the previous step's ids are still in flight
                raise RuntimeError("injected")
            return run(batch, rows, pending)

        e.runner.run = flaky
        with pytest.raises(EngineStepError, match="injected"):
            e.generate(prompts, sp)
        e.runner.run = run
        assert [o.token_ids for o in e.generate(prompts, sp)] == expected
        pool = e.attention.pool
        assert sum(pool.ref) == 0 and not pool.tables and e._inflight is None

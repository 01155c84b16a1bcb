"""batcher="static": conformance, batch-at-a-time admission, max_num_seqs, the token budget."""
from __future__ import annotations

import pytest
import torch

from fastllm.core.request import Status
from fastllm.stages.attention.sdpa import SDPAAttention
from fastllm.stages.base import KVSpec
from fastllm.stages.batchers.static import StaticBatcher
from fastllm.testing import TrackingAttention, check_batcher, fake_request


@pytest.mark.parametrize("seqs,budget,kv", [(4, 32, 120), (1, 16, 80), (8, 64, None), (3, 17, 75)])
def test_conformance(seqs, budget, kv):
    check_batcher(StaticBatcher(), max_num_seqs=seqs, max_num_batched_tokens=budget, kv_capacity_tokens=kv)


def test_conformance_over_sdpa_with_a_memory_budget():
    attn = SDPAAttention(kv_cache_memory=150 * 2 * 2 * 2 * 8 * 4)
    attn.setup(KVSpec(2, 4, 2, 8, torch.float32, torch.device("cpu"), 8 ** -0.5))
    check_batcher(StaticBatcher(), attention=attn)


def _batcher(seqs=2, budget=16, kv=None) -> tuple[StaticBatcher, TrackingAttention]:
    attn, b = TrackingAttention(kv), StaticBatcher()
    b.setup(attn, seqs, budget)
    return b, attn


def _run(b: StaticBatcher, batch) -> None:
    """What the engine does with a batch: update, then append a token where one is sampled."""
    rows = batch.sampling()
    b.update(batch)
    for i in rows:
        batch.requests[i].token_ids.append(0)


def _finish(b: StaticBatcher, r) -> None:
    b.finish(r)
    r.status = Status.FINISHED


def test_admits_a_new_batch_only_when_the_previous_one_finished():
    b, attn = _batcher(seqs=2)
    r0, r1, r2 = (fake_request(f"r{i}", [1, 2, 3], max_tokens=4) for i in range(3))
    for r in (r0, r1, r2):
        b.add(r)
    batch = b.schedule()
    assert [r.id for r in batch.requests] == ["r0", "r1"] and batch.num_new == [3, 3]
    _run(b, batch)
    _finish(b, r0)
    batch = b.schedule()  # r1 still runs: r2 waits although a slot is free
    assert [r.id for r in batch.requests] == ["r1"] and sorted(attn.held) == ["r1"]
    _run(b, batch)
    _finish(b, r1)
    assert not attn.held and r2.status == Status.WAITING
    batch = b.schedule()
    assert [r.id for r in batch.requests] == ["r2"] and r2.status == Status.RUNNING
    assert attn.held == {"r2": r2.max_tokens_total}


def test_long_prompts_are_prefilled_in_chunks_within_the_budget():
    b, _ = _batcher(seqs=3, budget=16)
    long, short = fake_request("long", list(range(40)), 2), fake_request("short", [7, 8], 2)
    b.add(long)
    b.add(short)
    plan = []
    while True:
        batch = b.schedule()
        plan.append([(r.id, s, n) for r, s, n in zip(batch.requests, batch.start, batch.num_new)])
        assert batch.num_tokens <= 16
        _run(b, batch)
        for r in list(batch.requests):
            if len(r.output_ids) >= r.params.max_tokens:
                _finish(b, r)
        if not b.has_work():
            break
    assert plan == [
        [("long", 0, 16)],  # the budget goes to the first request first
        [("long", 16, 16)],
        [("long", 32, 8), ("short", 0, 2)],
        [("long", 40, 1), ("short", 2, 1)],
    ]


def test_max_num_seqs_and_kv_capacity_limit_admission():
    b, attn = _batcher(seqs=2, budget=64, kv=12)
    reqs = [fake_request(f"r{i}", [1, 2, 3, 4], max_tokens=2) for i in range(4)]  # 6 tokens of KV each
    for r in reqs:
        b.add(r)
    assert [r.id for r in b.schedule().requests] == ["r0", "r1"]
    b2, attn2 = _batcher(seqs=4, budget=64, kv=12)
    for r in [fake_request(f"q{i}", [1, 2, 3, 4], max_tokens=2) for i in range(4)]:
        b2.add(r)
    assert [r.id for r in b2.schedule().requests] == ["q0", "q1"]  # the cache holds two
    assert sum(attn2.held.values()) == 12


def test_finish_of_a_waiting_request_frees_nothing_and_forgets_it():
    b, attn = _batcher(seqs=1)
    r0, r1 = fake_request("r0", [1], 3), fake_request("r1", [2], 3)
    b.add(r0)
    b.add(r1)
    b.schedule()
    _finish(b, r1)
    assert b.requests() == [r0] and list(attn.held) == ["r0"]
    _finish(b, r0)
    assert not b.has_work() and not attn.held and b.schedule() is None

"""batcher="continuous": conformance, the token-budget rule, admission while others run,
preemption by recompute, prefix hits at admission, and the engine under memory pressure and
aborts (the block pool ends as full as it started)."""
from __future__ import annotations

import asyncio
import contextlib
import random
import time

import pytest
import torch

from fastllm import Engine, SamplingParams
from fastllm.core.request import Status
from fastllm.errors import ConfigError
from fastllm.stages.attention.paged import PagedAttention
from fastllm.stages.attention.sdpa import SDPAAttention
from fastllm.stages.base import KVSpec
from fastllm.stages.batchers.continuous import ContinuousBatcher
from fastllm.testing import TrackingAttention, check_batcher, fake_request
from helpers import make_tiny_model

OPTS = dict(dtype="float32", device="cpu", progress=False)
BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, fp32 (the tiny llama)
SPEC = KVSpec(2, 4, 2, 8, torch.float32, torch.device("cpu"), 8 ** -0.5)


@pytest.mark.parametrize("seqs,budget,kv", [(4, 32, 120), (1, 16, 80), (8, 64, None), (3, 17, 75), (4, 32, 60)])
def test_conformance(seqs, budget, kv):
    check_batcher(ContinuousBatcher(), max_num_seqs=seqs, max_num_batched_tokens=budget, kv_capacity_tokens=kv)


@pytest.mark.parametrize("block_size,blocks", [(16, 1000), (4, 20), (1, 75)])
def test_conformance_over_paged(block_size, blocks):
    attn = PagedAttention(block_size=block_size, kv_cache_memory=(blocks + 1) * block_size * 2 * 2 * 2 * 8 * 4)
    attn.setup(SPEC)
    b = ContinuousBatcher()
    check_batcher(b, attention=attn)
    assert attn.num_free_blocks == blocks and sum(attn.pool.ref) == 0
    assert (b.num_preemptions > 0) == (blocks < 1000)


def test_needs_a_paged_backend():
    attn = SDPAAttention()
    attn.setup(SPEC)
    with pytest.raises(ConfigError, match="attention='paged'"):
        ContinuousBatcher().setup(attn, 4, 32)


def _batcher(seqs=4, budget=16, kv=None) -> tuple[ContinuousBatcher, TrackingAttention]:
    attn, b = TrackingAttention(kv), ContinuousBatcher()
    b.setup(attn, seqs, budget)
    return b, attn


def _step(b: ContinuousBatcher) -> list[tuple[str, int, int]]:
    """One engine step: schedule, update, append a token where one is sampled, finish at max_tokens."""
    batch = b.schedule()
    plan = [(r.id, s, n) for r, s, n in zip(batch.requests, batch.start, batch.num_new)]
    rows = batch.sampling()
    b.update(batch)
    for i in rows:
        r = batch.requests[i]
        r.token_ids.append(0)
        if len(r.output_ids) >= r.params.max_tokens:
            b.finish(r)
    return plan


def test_running_first_then_waiting_within_one_token_budget():
    b, _ = _batcher(seqs=3, budget=16)
    long, short = fake_request("long", list(range(40)), 2), fake_request("short", [7, 8], 2)
    b.add(long)
    b.add(short)
    assert _step(b) == [("long", 0, 16)]
    late = fake_request("late", [1, 2, 3], 1)
    b.add(late)
    assert _step(b) == [("long", 16, 16)]
    assert _step(b) == [("long", 32, 8), ("short", 0, 2), ("late", 0, 3)]  # admitted while long runs
    assert _step(b) == [("long", 40, 1), ("short", 2, 1)]
    assert not b.has_work()


def test_admits_whenever_a_slot_frees():
    b, attn = _batcher(seqs=2, budget=64)
    reqs = [fake_request(f"r{i}", [1, 2, 3], max_tokens=m) for i, m in enumerate((1, 3, 2))]
    for r in reqs:
        b.add(r)
    assert _step(b) == [("r0", 0, 3), ("r1", 0, 3)]  # r0 finished: its slot goes to r2 at once
    assert _step(b) == [("r1", 3, 1), ("r2", 0, 3)]
    assert sorted(attn.held) == ["r1", "r2"]


def test_preempts_the_newest_running_request_and_recomputes_it_later():
    b, attn = _batcher(seqs=4, budget=64, kv=12)
    old, new = fake_request("old", [1, 2, 3, 4, 5], 4), fake_request("new", [6, 7, 8, 9, 10], 4)
    b.add(old)
    b.add(new)
    assert _step(b) == [("old", 0, 5), ("new", 0, 5)]  # 10 of 12 tokens
    assert _step(b) == [("old", 5, 1), ("new", 5, 1)]  # 12 of 12
    # old needs a 13th token: new is preempted, keeps its tokens, waits at the front
    assert _step(b) == [("old", 6, 1)]
    assert b.num_preemptions == 1 and new.status == Status.WAITING and new.num_computed == 0
    assert list(b.waiting) == [new] and new.token_ids == [6, 7, 8, 9, 10, 0, 0]
    assert "new" not in attn.held
    assert _step(b) == [("old", 7, 1)]  # old finishes with 9 tokens held; new fits again next step
    assert _step(b) == [("new", 0, 7)]  # prompt and both outputs recomputed as one prompt
    assert _step(b) == [("new", 7, 1)]
    assert not b.has_work() and not attn.held and new.output_ids == [0, 0, 0, 0]


def test_a_request_that_alone_lacks_blocks_waits_for_others():
    b, attn = _batcher(seqs=4, budget=64, kv=8)
    a, c = fake_request("a", [1] * 6, 2), fake_request("c", [2] * 4, 2)
    b.add(a)
    b.add(c)
    assert _step(b) == [("a", 0, 6)]  # c's 4 tokens do not fit next to a's 6: admission stops
    assert _step(b) == [("a", 6, 1)]
    assert _step(b) == [("c", 0, 4)]


def test_waiting_request_starts_after_its_cached_prefix():
    attn = PagedAttention(block_size=4, kv_cache_memory=64 * 4 * 2 * 2 * 2 * 8 * 4)
    attn.setup(SPEC)
    b = ContinuousBatcher()
    b.setup(attn, 4, 64)
    shared = list(range(10))
    b.add(fake_request("a", shared + [50], 1))
    assert _step(b) == [("a", 0, 11)]
    b.add(fake_request("b", shared + [60, 61], 1))
    assert _step(b) == [("b", 8, 4)]  # two full blocks of a (8 tokens) were cached
    assert attn.pool.prefix_hits == 8 and attn.num_free_blocks == attn.num_blocks - 1


def test_finish_is_idempotent_and_frees_once():
    b, attn = _batcher(seqs=1, budget=16)
    r0, r1 = fake_request("r0", [1, 2], 5), fake_request("r1", [3], 5)
    b.add(r0)
    b.add(r1)
    _step(b)
    b.finish(r1)  # waiting: holds nothing
    b.finish(r0)
    b.finish(r0)  # an abort racing the last token: nothing happens twice
    b.finish(r1)
    assert not attn.held and not attn.errors and not b.has_work() and b.schedule() is None


# ---- the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("continuous"), "llama")


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_under_a_tiny_cache_keeps_greedy_outputs(tiny_llama, overlap):
    rng = random.Random(0)
    prompts = [[rng.randrange(300) for _ in range(rng.randint(20, 40))] for _ in range(8)]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outs = []
    for blocks in (1000, 9):  # 8 x 16 = 128 tokens: two sequences of up to 70
        attention = {"name": "paged", "kv_cache_memory": (blocks + 1) * 16 * BYTES_PER_TOKEN}
        with Engine(str(tiny_llama), batcher="continuous", attention=attention, max_num_batched_tokens=64,
                    async_scheduling=overlap, **OPTS) as e:
            res = e.generate([{"prompt_token_ids": p} for p in prompts], sp)
            outs.append([o.token_ids for o in res])
            assert all(o.finish_reason == "length" for o in res)
            preemptions = e.batcher.num_preemptions
            assert e.attention.num_free_blocks == blocks and sum(e.attention.pool.ref) == 0
    assert preemptions > 0
    assert outs[0] == outs[1]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_thousand_requests_with_aborts_give_every_block_back(tiny_llama, overlap):
    rng = random.Random(0)  # 120 blocks of 8: the 64 running requests need up to 8,000 tokens, so some are preempted
    attention = {"name": "paged", "block_size": 8, "kv_cache_memory": 121 * 8 * BYTES_PER_TOKEN}
    with Engine(str(tiny_llama), batcher="continuous", attention=attention, max_num_seqs=64,
                async_scheduling=overlap, **OPTS) as e:
        pool = e.attention.pool
        start = pool.num_free_blocks
        stats = {"length": 0, "abort": 0, "cancelled": 0}

        async def one(i: int) -> None:
            prompt = [rng.randrange(300) for _ in range(rng.randint(1, 60))]
            if i % 7 == 0:  # some share a prefix with each other
                prompt = [5] * 24 + prompt
            sp = SamplingParams(temperature=0, max_tokens=rng.randint(1, 20), ignore_eos=True)
            stop_after = rng.randint(1, 5) if rng.random() < 0.2 else None
            await asyncio.sleep(rng.random() * 0.5)
            async with contextlib.aclosing(e.astream({"prompt_token_ids": prompt}, sp)) as it:
                n = 0
                async for chunk in it:
                    n += 1
                    if chunk.finish_reason:
                        stats[chunk.finish_reason] += 1
                    elif n == stop_after:  # closing the stream early aborts the request
                        stats["abort"] += 1
                        return

        async def main() -> None:
            tasks = [asyncio.create_task(one(i)) for i in range(1000)]
            await asyncio.sleep(0.3)
            for t in rng.sample(tasks, 100):  # cancelled wherever they are: waiting, mid-prefill, decoding
                t.cancel()
            for t in tasks:
                try:
                    await t
                except asyncio.CancelledError:
                    stats["cancelled"] += 1

        asyncio.run(main())
        end = time.time() + 20
        while time.time() < end and (e.batcher.has_work() or pool.num_free_blocks != start):
            time.sleep(0.02)
        assert not e.batcher.has_work()
        assert pool.num_free_blocks == start and sum(pool.ref) == 0 and not pool.tables, (
            f"{start - pool.num_free_blocks} blocks leaked; ref counts sum to {sum(pool.ref)}")
        assert stats["length"] > 500 and stats["abort"] > 50 and stats["cancelled"] > 0, stats
        assert pool.prefix_hits > 0 and e.batcher.num_preemptions > 0

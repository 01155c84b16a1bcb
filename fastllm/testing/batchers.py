"""Conformance of batchers: drive one like the engine does, with fake requests and KV cache."""
from __future__ import annotations

import random
from typing import Any

from ..core.request import Batch, Request, Status
from .api import check_api_version
from .reference import fake_request

PROMPTS = [1, 5, 33, 70, 8, 2, 17, 3, 40, 1, 12, 9]  # tokens; 70 needs several prefill chunks
MAX_TOKENS = [1, 4, 3, 2, 6, 1, 5, 2, 3, 7, 1, 4]
ARRIVALS = {0: range(0, 8), 3: range(8, 10), 7: range(10, 12)}  # step -> requests added before it
ABORT_WAITING = 11  # aborted in the step it arrives, before any schedule
ABORT_RUNNING = 3  # aborted once part of its prompt is computed


PAGING = ("match_prefix", "reserve", "cache_full_blocks")


class TrackingAttention:
    """Stands in for the attention backend (or wraps a real one) and records what the batcher
    allocates and frees. A second allocate or a free of nothing fails at once.

    It offers the paging verbs (match_prefix, reserve, cache_full_blocks) when it wraps no
    backend (a fake paged cache of `capacity_tokens` tokens that never hits a prefix) or one
    that has them."""

    api_version = 1

    def __init__(self, capacity_tokens: int | None = None, inner: Any = None):
        self.inner = inner
        self.capacity_tokens = getattr(inner, "capacity_tokens", None) if inner is not None else capacity_tokens
        self.held: dict[str, int] = {}
        self.preempted: set[str] = set()
        self.finishing: str | None = None
        self.errors: list[str] = []
        if inner is None or all(callable(getattr(inner, m, None)) for m in PAGING):
            self.match_prefix, self.reserve, self.cache_full_blocks = (
                self._match_prefix, self._reserve, self._cache_full_blocks)

    def __getattr__(self, name: str) -> Any:  # anything else a batcher needs from a real backend
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def _fail(self, msg: str) -> None:
        self.errors.append(msg)
        raise AssertionError(msg)

    def setup(self, spec) -> None:
        if self.inner is not None:
            self.inner.setup(spec)

    def can_allocate(self, num_tokens: int) -> bool:
        if self.inner is not None:
            return self.inner.can_allocate(num_tokens)
        return self.capacity_tokens is None or sum(self.held.values()) + num_tokens <= self.capacity_tokens

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        if seq_id in self.held:
            self._fail(f"the batcher allocated KV for request {seq_id!r} twice without freeing it "
                       "(a sequence's KV is allocated once, for its full length)")
        if not self.can_allocate(num_tokens):
            self._fail(f"the batcher allocated {num_tokens} tokens for {seq_id!r} while can_allocate({num_tokens}) "
                       f"is False ({sum(self.held.values())} of {self.capacity_tokens} tokens held)")
        self.held[seq_id] = num_tokens
        if self.inner is not None:
            self.inner.allocate(seq_id, num_tokens)

    def free(self, seq_id: str) -> None:
        if seq_id not in self.held:
            self._fail(f"the batcher freed the KV of {seq_id!r}, which holds none (freed twice, or never allocated)")
        del self.held[seq_id]
        if seq_id != self.finishing:
            self.preempted.add(seq_id)
        if self.inner is not None:
            self.inner.free(seq_id)

    def _match_prefix(self, seq_id: str, token_ids: list[int]) -> int:
        if seq_id in self.held:
            self._fail(f"the batcher looked up the prefix of {seq_id!r}, which already holds KV "
                       "(a sequence starts from the prefix cache once, before its first reserve)")
        cached = self.inner.match_prefix(seq_id, token_ids) if self.inner is not None else 0
        if not 0 <= cached < len(token_ids):
            self._fail(f"match_prefix({seq_id!r}) of {len(token_ids)} tokens returned {cached}; the last "
                       "token is never cached")
        self.held[seq_id] = cached
        return cached

    def _reserve(self, seq_id: str, num_tokens: int) -> bool:
        have = self.held.get(seq_id, 0)
        if self.inner is not None:
            ok = self.inner.reserve(seq_id, num_tokens)
        else:
            ok = (self.capacity_tokens is None
                  or sum(self.held.values()) - have + max(have, num_tokens) <= self.capacity_tokens)
        if ok:
            self.held[seq_id] = max(have, num_tokens)
        return ok

    def _cache_full_blocks(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        if num_computed > self.held.get(seq_id, 0):
            self._fail(f"cache_full_blocks({seq_id!r}, num_computed={num_computed}) while it holds KV for "
                       f"{self.held.get(seq_id, 0)} tokens (freed, or never reserved)")
        if self.inner is not None:
            self.inner.cache_full_blocks(seq_id, token_ids, num_computed)

    def plan(self, batch: Batch) -> Any:
        return self.inner.plan(batch) if self.inner is not None else None

    def forward(self, layer, q, k, v, meta):
        return self.inner.forward(layer, q, k, v, meta)


def check_batcher(batcher, *, max_num_seqs: int = 4, max_num_batched_tokens: int = 32,
                  kv_capacity_tokens: int | None = 120, attention: Any = None, seed: int = 0,
                  max_steps: int = 5000) -> None:
    """Run a fresh `batcher` the way the engine does over requests that arrive over time, some
    long enough to need chunked prefill, one aborted while waiting and one while running. Checks:
    every token of every request is scheduled exactly once and in order, each batch keeps to
    max_num_seqs and the token budget, scheduled tokens have KV allocated, finish() frees KV
    exactly once, requests() and has_work() tell the truth, and no request is lost. A batcher
    may preempt (free a running request's KV); the request then resumes at or before the token
    it had reached.

    `attention`: a real backend already set up, whose own bookkeeping the batcher may need
    (default: a fake with `kv_capacity_tokens` tokens of room, which also offers the paging
    verbs match_prefix / reserve / cache_full_blocks of a paged backend)."""
    check_api_version(batcher, "batcher")
    name = type(batcher).__name__
    attn = TrackingAttention(kv_capacity_tokens, inner=attention)
    batcher.setup(attn, max_num_seqs, max_num_batched_tokens)
    rng = random.Random(seed)
    vocab = 1 << 30  # distinct random tokens: no prefix is shared, so nothing may be skipped
    reqs = [fake_request(f"r{i}", [rng.randrange(vocab) for _ in range(p)], m)
            for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS))]
    active: dict[str, Request] = {}
    done: set[str] = set()
    scheduled: dict[str, int] = {}  # tokens of each request scheduled so far

    def finish(r: Request, reason: str) -> None:  # what Engine._finish does
        r.finish_reason = reason
        attn.finishing = r.id
        batcher.finish(r)
        attn.finishing = None
        r.status = Status.FINISHED
        assert r.id not in attn.held, f"{name}: finish({r.id}) did not free its KV"
        del active[r.id]
        done.add(r.id)

    for step in range(max_steps):
        for i in ARRIVALS.get(step, ()):
            batcher.add(reqs[i])
            active[reqs[i].id] = reqs[i]
            if i == ABORT_WAITING:
                finish(reqs[i], "abort")
        listed = sorted(r.id for r in batcher.requests())
        assert listed == sorted(active), f"{name}: before step {step}, requests() lists {listed}; " \
                                         f"the unfinished requests are {sorted(active)}"
        assert batcher.has_work() == bool(active), (
            f"{name}: has_work() is {batcher.has_work()} with {len(active)} unfinished requests")
        if not active and step > max(ARRIVALS):
            break
        batch = batcher.schedule()
        if batch is None:
            assert not active, (f"{name}: schedule() returned None at step {step} while requests "
                                f"{sorted(active)} wait with free KV: the engine would spin forever")
            continue
        _check_batch(batch, name, step, max_num_seqs, max_num_batched_tokens, attn, active, scheduled)
        attn.plan(batch)
        rows = batch.sampling()
        batcher.update(batch)
        for r, s, n in zip(batch.requests, batch.start, batch.num_new):
            assert r.num_computed == s + n, (f"{name}: after update() request {r.id} has num_computed="
                                             f"{r.num_computed}; it ran tokens {s}..{s + n - 1}")
        for i in rows:
            r = batch.requests[i]
            r.token_ids.append(rng.randrange(vocab))
            if len(r.output_ids) >= r.params.max_tokens:
                finish(r, "length")
        victim = reqs[ABORT_RUNNING]
        if victim.id in active and 0 < scheduled.get(victim.id, 0) < victim.num_prompt:
            finish(victim, "abort")
    else:
        raise AssertionError(f"{name}: requests {sorted(active)} still unfinished after {max_steps} steps")

    for i, r in enumerate(reqs):
        assert r.id in done, f"{name}: request {r.id} was lost: added, never finished"
        if i not in (ABORT_WAITING, ABORT_RUNNING):
            assert scheduled.get(r.id) == len(r.token_ids) - 1, (
                f"{name}: request {r.id} ran {scheduled.get(r.id)} tokens; its prompt and outputs "
                f"but the last sampled one are {len(r.token_ids) - 1}")
    assert not attn.held, f"{name}: KV of {sorted(attn.held)} was never freed"
    assert not attn.errors, f"{name}: {attn.errors[0]}"


def _check_batch(batch: Batch, name: str, step: int, max_num_seqs: int, budget: int,
                 attn: TrackingAttention, active: dict[str, Request], scheduled: dict[str, int]) -> None:
    where = f"{name}, step {step}"
    assert isinstance(batch, Batch), f"{where}: schedule() returned a {type(batch).__name__}, not a Batch"
    ids = [r.id for r in batch.requests]
    assert len(ids) == len(batch.num_new) == len(batch.start), f"{where}: requests, num_new and start differ in length"
    assert len(set(ids)) == len(ids), f"{where}: a request appears twice in one batch: {ids}"
    assert 0 < len(ids) <= max_num_seqs, f"{where}: {len(ids)} requests in a batch, max_num_seqs is {max_num_seqs}"
    assert len(attn.held) <= max_num_seqs, (
        f"{where}: {len(attn.held)} sequences hold KV at once, max_num_seqs is {max_num_seqs}")
    assert batch.num_tokens <= budget, f"{where}: {batch.num_tokens} tokens in a batch, the budget is {budget}"
    for r, s, n in zip(batch.requests, batch.start, batch.num_new):
        assert r.id in active, f"{where}: request {r.id} was scheduled after it finished"
        assert type(n) is int and n >= 1, f"{where}: request {r.id} is scheduled with num_new={n!r}"
        expect = scheduled.get(r.id, 0)
        if r.id in attn.preempted:  # its KV was taken back: it may recompute from an earlier token
            assert s <= expect, f"{where}: preempted request {r.id} resumes at token {s}, past {expect}"
            attn.preempted.discard(r.id)
        else:
            assert s == expect, (f"{where}: request {r.id} is scheduled from token {s}, but tokens "
                                 f"0..{expect - 1} ran so far: every token runs exactly once, in order")
        assert s + n <= len(r.token_ids), (f"{where}: request {r.id} is scheduled up to token {s + n}, "
                                           f"it has only {len(r.token_ids)}")
        held = attn.held.get(r.id, 0)
        assert held >= s + n, f"{where}: request {r.id} runs tokens up to {s + n} with KV for {held} allocated"
        scheduled[r.id] = s + n

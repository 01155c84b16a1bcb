"""`batcher="continuous"`: vLLM v1's one token-budget rule over a paged KV cache.

Each step, running requests come first (decodes and unfinished prompt chunks), each getting
min(tokens not yet computed, budget left); then waiting requests in arrival order, each
starting after its cached prefix. A long prompt is prefilled in chunks over several steps.
When a running request cannot get a block, the newest running request is preempted: its
blocks are freed and it waits at the front of the queue to be recomputed, prompt and output
tokens together, mostly from the prefix cache.

num_computed advances at schedule time (as in vLLM v1), so the engine may schedule step N+1
before step N's sampled tokens reach the host (`overlap = True`): a request whose last token
is still PENDING is fed it on the device, and one with nothing left to compute (its pending
token ends it by length) is skipped. update() publishes the full blocks once the step's
tokens are known.
"""
from __future__ import annotations

from collections import deque

from ...core.request import Batch, Request, Status
from ...errors import ConfigError
from ..base import AttentionBackend

PAGING = ("match_prefix", "reserve", "cache_full_blocks")


class ContinuousBatcher:
    api_version = 1
    overlap = True  # tolerates PENDING last tokens: the engine may schedule one step ahead

    def __init__(self) -> None:
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def setup(self, attention: AttentionBackend, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        missing = [m for m in PAGING if not callable(getattr(attention, m, None))]
        if missing:
            raise ConfigError(f"batcher 'continuous' needs a paged attention backend (one with "
                              f"{', '.join(PAGING)}); {type(attention).__name__} lacks {missing}. "
                              f"Use attention='paged'")
        self.attention = attention
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> Batch | None:
        budget = self.token_budget
        reqs: list[Request] = []
        starts: list[int] = []
        nums: list[int] = []
        reserve = self.attention.reserve
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            r = self.running[i]
            start = r.num_computed
            n = min(len(r.token_ids) - start, budget)
            if n <= 0:  # its in-flight token is its last: nothing to compute
                i += 1
                continue
            while not reserve(r.id, start + n):
                self._preempt(self.running.pop())  # the newest; never one scheduled above
                preempted = True
                if i == len(self.running):  # r itself was the newest
                    break
            else:
                reqs.append(r)
                starts.append(start)
                nums.append(n)
                r.num_computed = start + n
                budget -= n
                i += 1
        while self.waiting and not preempted and len(self.running) < self.max_num_seqs and budget > 0:
            r = self.waiting[0]
            cached = self.attention.match_prefix(r.id, r.token_ids)
            n = min(len(r.token_ids) - cached, budget)
            if not reserve(r.id, cached + n):
                self.attention.free(r.id)
                break
            self.waiting.popleft()
            r.num_computed, r.status = cached + n, Status.RUNNING
            self.running.append(r)
            reqs.append(r)
            starts.append(cached)
            nums.append(n)
            budget -= n
        return Batch(reqs, nums, starts) if reqs else None

    def _preempt(self, r: Request) -> None:
        self.attention.free(r.id)
        r.num_computed, r.status = 0, Status.WAITING
        self.waiting.appendleft(r)
        self.num_preemptions += 1

    def update(self, batch: Batch) -> None:
        publish, running = self.attention.cache_full_blocks, Status.RUNNING
        for r, s, n in zip(batch.requests, batch.start, batch.num_new):
            if r.status is running:  # else finished or preempted since the step was scheduled
                publish(r.id, r.token_ids, s + n)

    def finish(self, request: Request) -> None:
        """Free the request's KV once, whether it runs or waits; a second call does nothing."""
        if request.status == Status.RUNNING and request in self.running:
            self.running.remove(request)
            self.attention.free(request.id)
        elif request in self.waiting:
            self.waiting.remove(request)  # a waiting request holds no blocks
        request.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def requests(self) -> list[Request]:
        return list(self.waiting) + self.running

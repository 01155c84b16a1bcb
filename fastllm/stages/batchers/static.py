"""`batcher="static"`: the simple baseline. A batch is admitted when the previous one is done
and runs to completion; every step spends one token budget over its requests (prompt chunks
and decodes alike), so long prompts are prefilled in chunks."""
from __future__ import annotations

from collections import deque

from ...core.request import Batch, Request, Status
from ..base import AttentionBackend


class StaticBatcher:
    api_version = 1

    def __init__(self) -> None:
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def setup(self, attention: AttentionBackend, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.attention = attention
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if not self.attention.can_allocate(r.max_tokens_total):
                break
            self.waiting.popleft()
            self.attention.allocate(r.id, r.max_tokens_total)
            r.status = Status.RUNNING
            self.running.append(r)

    def schedule(self) -> Batch | None:
        if not self.running:
            self._admit()
        budget, reqs, nums = self.token_budget, [], []
        for r in self.running:
            n = min(r.num_uncomputed, budget)
            if n > 0:
                reqs.append(r)
                nums.append(n)
                budget -= n
        return Batch(reqs, nums) if reqs else None

    def update(self, batch: Batch) -> None:
        for r, n in zip(batch.requests, batch.num_new):
            r.num_computed += n

    def finish(self, request: Request) -> None:
        if request.status == Status.RUNNING:
            self.running.remove(request)
            self.attention.free(request.id)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def requests(self) -> list[Request]:
        return list(self.waiting) + self.running

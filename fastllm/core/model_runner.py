"""Runs the model over one flat batch and returns the logits of the rows that sample."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from ..models.context import ForwardContext
from .request import Batch, Request


class ModelRunner:
    def __init__(self, model: nn.Module, attention, device: torch.device, graphs=None):
        self.model, self.attention, self.device, self.graphs = model, attention, device, graphs
        self._score_ids = itertools.count()

    @torch.inference_mode()
    def run(self, batch: Batch, rows: list[int], pending: torch.Tensor | None = None) -> torch.Tensor:
        """Forward all tokens of `batch`; logits [len(rows), V] at the last token of each row.
        `pending`: the in-flight step's sampled ids [R] on the device, which fill the batch's
        PENDING tokens (a sequence whose last token is still being sampled)."""
        ids, pos, dst, src = batch.flat()
        ends = list(itertools.accumulate(batch.num_new))
        host = torch.tensor(ids + pos + [ends[i] - 1 for i in rows] + dst + src, dtype=torch.long)
        if self.device.type == "cuda":  # one pinned, asynchronous copy: no stream sync mid-step
            host = host.pin_memory().to(self.device, non_blocking=True)
        T, R, F = len(ids), len(rows), len(dst)
        input_ids, positions, last = host[:T], host[T:2 * T], host[2 * T:2 * T + R]  # [T], [T], [R]
        if F:  # the sampled ids never visit the host on their way back in
            fill = host[2 * T + R:]
            input_ids.index_copy_(0, fill[:F], pending.index_select(0, fill[F:]))
        meta = self.attention.plan(batch)
        logits = self.graphs.run(input_ids, positions, meta) if self.graphs is not None else None
        if logits is not None:  # every row of a decode step samples, in order
            return logits if R == T else logits.index_select(0, last)
        hidden = self.model(input_ids, positions, ForwardContext(self.attention, meta, batch))
        return self.model.compute_logits(hidden.index_select(0, last))

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, V] at every position of one sequence (evaluation, parity tests)."""
        from ..sampling import SamplingParams

        req = Request(f"score-{next(self._score_ids)}", None, list(token_ids),
                      SamplingParams(max_tokens=1), sink=lambda _: None, max_len=len(token_ids) + 1)
        if not self.attention.can_allocate(len(token_ids)):
            from ..errors import PromptTooLongError

            raise PromptTooLongError(f"{len(token_ids)} tokens do not fit the free KV cache now; "
                                     "retry when fewer requests run, or give the cache more memory")
        self.attention.allocate(req.id, len(token_ids))
        try:
            batch = Batch([req], [len(token_ids)])
            ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
            pos = torch.arange(len(token_ids), device=self.device)
            hidden = self.model(ids, pos, ForwardContext(self.attention, self.attention.plan(batch), batch))
            return self.model.compute_logits(hidden)
        finally:
            self.attention.free(req.id)

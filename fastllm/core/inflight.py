"""A launched step whose sampled ids are still on their way to the host.

Overlapped scheduling keeps one of these alive while the next step is scheduled and launched:
the ids go back by a pinned, non-blocking copy, and the host waits on its event only after
the next step is queued, so the device never idles on host bookkeeping.
"""
from __future__ import annotations

import torch

from .request import PENDING, Batch, Request


class InFlight:
    def __init__(self, batch: Batch, sampled: list[Request], ids: torch.Tensor | None):
        self.batch, self.sampled, self.ids = batch, sampled, ids  # ids: [len(sampled)] on the device
        # where each sampled token goes in its request's token_ids
        self.index = [len(r.token_ids) for r in sampled]
        self.needs_sync = any(r.params.uses_penalties for r in sampled)  # penalties read past outputs
        for row, r in enumerate(sampled):
            if len(r.token_ids) + 1 < r.max_tokens_total:  # another token will follow: the next step may feed this one
                r.token_ids.append(PENDING)
                r.pending_row = row
        self._host = self._event = None
        if ids is not None and ids.is_cuda:
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def tokens(self) -> list[int]:
        """The sampled ids; blocks until the step has run."""
        if self.ids is None:
            return []
        if self._event is None:
            return self.ids.tolist()
        self._event.synchronize()
        return self._host.tolist()

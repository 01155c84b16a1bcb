"""Oracles and fakes the conformance checks share: eager float64 attention, a reference
backend built on it, and requests that need no engine."""
from __future__ import annotations

import torch

from ..core.request import Batch, Request
from ..sampling import SamplingParams
from ..stages.base import KVSpec


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention in float64 of n new queries at positions start..start+n-1.

    q: [n, H, D]; k, v: [start + n, KVH, D] (the whole sequence so far) -> [n, H, D] float64."""
    n, heads, _ = q.shape
    group = heads // k.shape[1]
    qq = q.double().transpose(0, 1)  # [H, n, D]
    kk = k.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
    vv = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = qq @ kk.transpose(1, 2) * scale  # [H, n, S]
    qpos = torch.arange(start, start + n, device=q.device)
    kpos = torch.arange(k.shape[0], device=q.device)
    scores = scores.masked_fill(kpos[None, :] > qpos[:, None], float("-inf"))
    return (scores.softmax(-1) @ vv).transpose(0, 1)  # [n, H, D]


class ReferenceAttention:
    """`AttentionBackend` of plain float64 eager attention: slow, simple, and the oracle the
    model checks run with. `capacity_tokens` (None: no limit) bounds the tokens held."""

    api_version = 1

    def __init__(self, capacity_tokens: int | None = None):
        self.capacity_tokens = capacity_tokens
        self.caches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.used_tokens = 0

    def setup(self, spec: KVSpec) -> None:
        self.spec = spec

    def can_allocate(self, num_tokens: int) -> bool:
        return self.capacity_tokens is None or self.used_tokens + num_tokens <= self.capacity_tokens

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        s = self.spec
        shape = (s.num_layers, num_tokens, s.num_kv_heads, s.head_dim)
        self.caches[seq_id] = (torch.zeros(shape, dtype=torch.float64, device=s.device),
                               torch.zeros(shape, dtype=torch.float64, device=s.device))
        self.used_tokens += num_tokens

    def free(self, seq_id: str) -> None:
        kv = self.caches.pop(seq_id, None)
        if kv is not None:
            self.used_tokens -= kv[0].shape[1]

    def plan(self, batch: Batch) -> list[tuple[str, int, int, int]]:
        offsets = [sum(batch.num_new[:i]) for i in range(len(batch.requests))]
        return [(r.id, s, n, o) for r, s, n, o in zip(batch.requests, batch.start, batch.num_new, offsets)]

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D]
        out = torch.empty_like(q)
        for seq_id, s, n, o in meta:
            kc, vc = self.caches[seq_id]
            kc[layer, s:s + n] = k[o:o + n].double()
            vc[layer, s:s + n] = v[o:o + n].double()
            ref = eager_attention(q[o:o + n], kc[layer, :s + n], vc[layer, :s + n], s, self.spec.scale)
            out[o:o + n] = ref.to(q.dtype)
        return out


def fake_request(request_id: str, prompt_ids: list[int], max_tokens: int = 16, max_len: int = 1 << 20) -> Request:
    """A Request as the engine builds it, with no tokenizer and a sink that drops everything."""
    return Request(request_id, None, list(prompt_ids), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   sink=lambda _: None, max_len=max_len)

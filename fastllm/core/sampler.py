"""Sampling on the device: penalties, temperature, top-k, top-p, min-p, per-request seeds.

The only host transfer per step is reading the sampled ids. Random choice is the exponential
race (argmax of p / q with q ~ Exp(1)), which lets each seeded request draw its own noise from
its own generator, so its tokens do not depend on what else shares the batch.
"""
from __future__ import annotations

import torch

from .request import Request


def on_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list on the device without a stream sync (a plain torch.tensor(...,
    device="cuda") waits for the device to drain, which would stall overlapped steps)."""
    t = torch.tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """logits [B, V] fp32 -> token ids [B]."""
        params = [r.params for r in reqs]
        if any(p.uses_penalties for p in params):
            logits = self._penalize(logits.clone(), reqs)
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        dev = logits.device
        greedy = on_device([p.greedy for p in params], dev)
        temp = on_device([p.temperature if p.temperature > 0 else 1.0 for p in params], dev)
        x = logits / temp[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            x = self._top_k_top_p(x, params)
        probs = x.softmax(dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = on_device([p.min_p for p in params], dev)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), 0.0)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, r in enumerate(reqs):
            if r.generator is not None:
                q[i].exponential_(generator=r.generator)
        sampled = (probs / q).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def _top_k_top_p(self, x: torch.Tensor, params) -> torch.Tensor:
        V = x.shape[-1]
        dev = x.device
        srt, idx = x.sort(dim=-1)  # ascending
        k = on_device([p.top_k if p.top_k > 0 else V for p in params], dev).clamp(max=V)
        kth = srt.gather(1, (V - k)[:, None])
        srt = srt.masked_fill(srt < kth, float("-inf"))
        top_p = on_device([p.top_p for p in params], dev)
        cum = srt.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1.0 - top_p)[:, None]
        drop[:, -1] = False  # always keep the most likely token
        srt = srt.masked_fill(drop, float("-inf"))
        return torch.empty_like(x).scatter_(1, idx, srt)

    def _penalize(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        B, V = logits.shape
        dev = logits.device

        def padded(lists: list[list[int]]) -> torch.Tensor:
            n = max(1, max(len(x) for x in lists))
            return torch.tensor([x + [V] * (n - len(x)) for x in lists], device=dev)  # V = padding bin

        out_counts = torch.zeros(B, V + 1, device=dev)
        out_ids = padded([r.output_ids for r in reqs])
        out_counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=out_counts.dtype))
        out_counts = out_counts[:, :V]
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=dev)
        seen.scatter_(1, padded([r.prompt_ids for r in reqs]), True)
        seen = seen[:, :V] | (out_counts > 0)
        rep = torch.tensor([r.params.repetition_penalty for r in reqs], device=dev)[:, None]
        pres = torch.tensor([r.params.presence_penalty for r in reqs], device=dev)[:, None]
        freq = torch.tensor([r.params.frequency_penalty for r in reqs], device=dev)[:, None]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        return logits - freq * out_counts - pres * (out_counts > 0).to(logits.dtype)

"""`attention="sdpa"`: torch scaled_dot_product_attention over one contiguous KV cache per sequence.

The baseline backend: each sequence gets K/V tensors [layers, kv_heads, capacity, head_dim]
sized to its prompt plus max_tokens when it is admitted, so a decode step reads a view with
no gather. Attention runs per sequence (linear layers stay batched over the flat batch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.request import Batch
from ..base import KVSpec


@dataclass
class _Seq:
    k: torch.Tensor  # [L, KVH, capacity, D]
    v: torch.Tensor
    start: int  # tokens already in the cache
    n: int  # tokens this step
    offset: int  # first row in the flat batch


class SDPAAttention:
    api_version = 1

    def __init__(self, kv_cache_memory: int | None = None):
        """kv_cache_memory: bytes the KV cache may take in all (None: no limit)."""
        self.kv_cache_memory = kv_cache_memory
        self.caches: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.used_tokens = 0

    def setup(self, spec: KVSpec) -> None:
        self.spec = spec
        # On the CPU, torch's bf16 attention is several times slower than fp32 for one query
        # row against hundreds of keys (303 vs 55 us at 512 keys), so the CPU cache is fp32.
        self.kv_dtype = torch.float32 if spec.device.type == "cpu" else spec.dtype
        elt = torch.empty((), dtype=self.kv_dtype).element_size()
        self.bytes_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * elt

    @property
    def capacity_tokens(self) -> int | None:
        if self.kv_cache_memory is None:
            return None
        return self.kv_cache_memory // self.bytes_per_token

    def can_allocate(self, num_tokens: int) -> bool:
        cap = self.capacity_tokens
        return cap is None or self.used_tokens + num_tokens <= cap

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        self.free(seq_id)  # a sequence allocated again gives back its old cache first
        s = self.spec
        shape = (s.num_layers, s.num_kv_heads, num_tokens, s.head_dim)
        self.caches[seq_id] = (torch.empty(shape, dtype=self.kv_dtype, device=s.device),
                               torch.empty(shape, dtype=self.kv_dtype, device=s.device))
        self.used_tokens += num_tokens

    def free(self, seq_id: str) -> None:
        kv = self.caches.pop(seq_id, None)
        if kv is not None:
            self.used_tokens -= kv[0].shape[2]

    def plan(self, batch: Batch) -> list[_Seq]:
        seqs, offset = [], 0
        for r, s, n in zip(batch.requests, batch.start, batch.num_new):
            k, v = self.caches[r.id]
            seqs.append(_Seq(k, v, s, n, offset))
            offset += n
        return seqs

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: list[_Seq]) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D]
        out = torch.empty_like(q)
        for seq in meta:
            s, n, o = seq.start, seq.n, seq.offset
            kc, vc = seq.k[layer], seq.v[layer]  # [KVH, cap, D]
            kc[:, s:s + n] = k[o:o + n].transpose(0, 1)
            vc[:, s:s + n] = v[o:o + n].transpose(0, 1)
            qq = q[o:o + n].transpose(0, 1)[None].to(self.kv_dtype)  # [1, H, n, D]
            kk, vv = kc[None, :, :s + n], vc[None, :, :s + n]  # [1, KVH, S, D]
            mask, causal = None, False
            if n > 1 and s == 0:
                causal = True
            elif n > 1:  # a chunk after cached tokens: query i sees keys <= s + i
                kpos = torch.arange(s + n, device=q.device)
                mask = kpos[None, :] <= (s + torch.arange(n, device=q.device))[:, None]
            o_ = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=causal,
                                                scale=self.spec.scale, enable_gqa=True)
            out[o:o + n] = o_[0].transpose(0, 1)
        return out

"""`attention="paged"`: one preallocated KV cache cut into fixed-size blocks, with automatic
prefix caching. Sequences hold block tables (fastllm.core.kv_cache.BlockPool), so memory is
given out a block at a time as they grow, and full blocks of a shared prefix are computed once.

On CUDA, attention runs the Triton kernels of fastllm.kernels.paged_attention (imported only
there); on the CPU, a torch path gathers each sequence's blocks and runs
scaled_dot_product_attention.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...core.kv_cache import NULL_BLOCK, BlockPool
from ...core.request import Batch
from ...errors import ConfigError
from ..base import KVSpec

GiB = 1 << 30
CPU_DEFAULT_MEMORY = GiB
ACTIVATION_RESERVE = GiB  # left free on the GPU for activations, logits and the allocator's slack


@dataclass
class PagedMeta:
    """One step's attention metadata. Tensors are on the cache's device; the host ints let
    forward() choose a kernel and size grids without a device sync."""

    slot_mapping: torch.Tensor  # int64 [T]: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # int32 [B, max_blocks], padded with the null block 0
    seq_lens: torch.Tensor  # int32 [B]: keys in the cache once this step's tokens are stored
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]: row offsets of each sequence in the flat batch
    query_lens: list[int]
    context_lens: list[int]  # seq_lens on the host
    decode_only: bool
    max_query_len: int
    max_seq_len: int
    # CPU path only: the cache slots of every key each sequence reads. Decode steps: int64
    # [B, max_seq_len], padded with slot 0 of the zeroed null block, and key_mask bool
    # [B, 1, 1, max_seq_len] (one batched attention); other steps: int64 [sum(seq_lens)].
    key_slots: torch.Tensor | None = None
    key_mask: torch.Tensor | None = None
    # kernel path, decode steps: fp32 [B, H, splits, D + 1] partial results of paged_decode, shared
    # by all layers (a CUDA-graph runner swaps in a slice of a static one)
    decode_scratch: torch.Tensor | None = None
    num_splits: int = 8  # split-K partitions of paged_decode for this batch size


class PagedAttention:
    api_version = 1

    def __init__(self, block_size: int = 16, gpu_memory_utilization: float = 0.9,
                 kv_cache_memory: int | None = None, enable_prefix_caching: bool = True):
        """block_size: tokens per block. kv_cache_memory: bytes of the cache (default: on CUDA,
        gpu_memory_utilization of the GPU less what is in use and an activation reserve; on the
        CPU 1 GiB). enable_prefix_caching: reuse computed full blocks of shared prefixes."""
        if block_size < 1:
            raise ConfigError(f"paged attention: block_size must be >= 1, got {block_size}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ConfigError(f"paged attention: gpu_memory_utilization is a fraction in (0, 1], "
                              f"got {gpu_memory_utilization}")
        if kv_cache_memory is not None and kv_cache_memory <= 0:
            raise ConfigError(f"paged attention: kv_cache_memory is bytes > 0, got {kv_cache_memory}")
        self.block_size = block_size
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_memory = kv_cache_memory
        self.enable_prefix_caching = enable_prefix_caching

    def setup(self, spec: KVSpec) -> None:
        if spec.device.type not in ("cuda", "cpu"):
            raise ConfigError(f"paged attention runs on 'cuda' or 'cpu', not {spec.device.type!r}; "
                              "use attention='sdpa'")
        self.spec = spec
        # fp32 on the CPU, as in sdpa.py: torch's bf16 CPU attention is slow for decode
        self.kv_dtype = torch.float32 if spec.device.type == "cpu" else spec.dtype
        elt = torch.empty((), dtype=self.kv_dtype).element_size()
        self.block_bytes = 2 * spec.num_layers * self.block_size * spec.num_kv_heads * spec.head_dim * elt
        budget = self.kv_cache_memory or self._default_budget(spec.device)
        num_blocks = budget // self.block_bytes
        if num_blocks < 2:
            raise ConfigError(f"paged attention: {budget} bytes of KV cache hold {num_blocks} blocks of "
                              f"{self.block_bytes} bytes; at least 2 are needed. Raise kv_cache_memory or "
                              f"gpu_memory_utilization, or lower block_size")
        shape = (spec.num_layers, 2, num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        # zeroed on the GPU so kernels never meet NaN in padding; CPU pages stay untouched until used
        make = torch.zeros if spec.device.type == "cuda" else torch.empty
        self.kv = make(shape, dtype=self.kv_dtype, device=spec.device)  # [L, 2, NB, bs, KVH, D]
        self.pool = BlockPool(num_blocks, self.block_size, self.enable_prefix_caching)
        self._kernels = None
        self._splits: dict[int, int] = {}  # paged_decode split count per batch size
        self._scratch: dict[int, tuple[int, torch.Tensor]] = {}  # eager decode steps' (splits, scratch)
        if spec.device.type == "cuda":
            if self.block_size & (self.block_size - 1):
                raise ConfigError(f"paged attention on CUDA needs a power-of-two block_size (the Triton "
                                  f"kernels tile by it), got {self.block_size}; try 16")
            from ...kernels import paged_attention

            self._kernels = paged_attention
        else:
            self.kv[:, :, NULL_BLOCK].zero_()  # padded keys read zeros, never NaN

    def _default_budget(self, device: torch.device) -> int:
        if device.type != "cuda":
            return CPU_DEFAULT_MEMORY
        free, total = torch.cuda.mem_get_info(device)
        return int(total * self.gpu_memory_utilization) - (total - free) - ACTIVATION_RESERVE

    # ---- sizes ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return (self.pool.num_blocks - 1) * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def describe(self, max_model_len: int | None = None) -> str:
        gib = self.kv.numel() * self.kv.element_size() / GiB
        line = (f"KV cache: {self.num_blocks - 1} blocks x {self.block_size} = {self.capacity_tokens} tokens "
                f"({gib:.3g} GiB)")
        if max_model_len:
            line += f"; {self.capacity_tokens // max_model_len} sequences of max_model_len={max_model_len} fit"
        return line

    # ---- blocks (delegated to the pool) ---------------------------------------------------
    def can_allocate(self, num_tokens: int) -> bool:
        return self.pool.can_allocate(num_tokens)

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        self.pool.allocate(seq_id, num_tokens)

    def free(self, seq_id: str) -> None:
        self.pool.free(seq_id)

    def match_prefix(self, seq_id: str, token_ids: list[int]) -> int:
        return self.pool.match_prefix(seq_id, token_ids)

    def reserve(self, seq_id: str, num_tokens: int) -> bool:
        return self.pool.reserve(seq_id, num_tokens)

    def cache_full_blocks(self, seq_id: str, token_ids: list[int], num_computed: int) -> None:
        self.pool.cache_full_blocks(seq_id, token_ids, num_computed)

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()

    # ---- the step -------------------------------------------------------------------------
    def plan(self, batch: Batch) -> PagedMeta:
        bs, dev = self.block_size, self.spec.device
        held = self.pool.tables
        tables = [held.get(r.id, []) for r in batch.requests]
        seq_lens = [s + n for s, n in zip(batch.start, batch.num_new)]
        slots: list[int] = []
        for t, s, n in zip(tables, batch.start, batch.num_new):
            if n == 1:  # a decode row: most rows of a busy step
                slots.append(t[s // bs] * bs + s % bs)
            else:
                slots.extend(t[p // bs] * bs + p % bs for p in range(s, s + n))
        used = [-(-L // bs) for L in seq_lens]  # blocks each sequence reads
        width = max(used)
        pad = [NULL_BLOCK] * width
        tables_t = torch.tensor([t[:u] + pad[u:] if u < width else t[:u] for t, u in zip(tables, used)],
                                dtype=torch.int32)
        host = dict(slot_mapping=torch.tensor(slots, dtype=torch.long), block_tables=tables_t,
                    seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                    cu_seqlens_q=torch.tensor([0, *itertools.accumulate(batch.num_new)], dtype=torch.int32))
        meta = PagedMeta(**host, query_lens=list(batch.num_new), context_lens=seq_lens,
                         decode_only=max(batch.num_new) == 1, max_query_len=max(batch.num_new),
                         max_seq_len=max(seq_lens))
        if dev.type == "cpu":
            self._plan_cpu(meta)
        else:  # one pinned host-to-device copy of all four bytes (int64 first: aligned), then views
            parts = [t.reshape(-1).view(torch.uint8) for t in host.values()]
            flat = torch.cat(parts).pin_memory().to(dev, non_blocking=True)
            for (name, t), part in zip(host.items(), flat.split([p.numel() for p in parts])):
                setattr(meta, name, part.view(t.dtype).view(t.shape))
        if self._kernels is not None and meta.decode_only:
            B = len(tables)
            if B not in self._scratch:  # reused step after step: paged_decode leaves it ready
                self._scratch[B] = self._splits_and_scratch(B)
            meta.num_splits, meta.decode_scratch = self._scratch[B]
        return meta

    def _splits_and_scratch(self, batch: int) -> tuple[int, torch.Tensor]:
        s = self.spec
        splits = self._splits.get(batch)
        if splits is None:  # (the kernels also run interpreted on the CPU in tests: 8 splits there)
            splits = (self._kernels.decode_num_splits(batch, s.num_kv_heads, s.device)
                      if s.device.type == "cuda" else 8)
            self._splits[batch] = splits
        return splits, self._kernels.decode_scratch(batch, s.num_heads, s.head_dim, splits, s.device)

    def decode_meta(self, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                    cu_seqlens_q: torch.Tensor) -> PagedMeta:
        """Decode metadata over a CUDA-graph runner's static buffers (rows padded with seq_len 0);
        its scratch lives as long as the graph that captures it."""
        B = seq_lens.shape[0]
        splits, scratch = self._splits_and_scratch(B)
        return PagedMeta(slot_mapping, block_tables, seq_lens, cu_seqlens_q, query_lens=[1] * B,
                         context_lens=[0] * B, decode_only=True, max_query_len=1,
                         max_seq_len=block_tables.shape[1] * self.block_size, decode_scratch=scratch,
                         num_splits=splits)

    def _plan_cpu(self, meta: PagedMeta) -> None:
        bs, S = self.block_size, meta.max_seq_len
        B = len(meta.query_lens)
        slots = (meta.block_tables.long()[:, :, None] * bs + torch.arange(bs)).view(B, -1)[:, :S]  # [B, S]
        valid = torch.arange(S)[None, :] < meta.seq_lens[:, None].long()
        if meta.decode_only:
            meta.key_slots, meta.key_mask = slots.masked_fill(~valid, NULL_BLOCK * bs), valid[:, None, None, :]
        else:
            meta.key_slots = slots[valid]

    # Decode steps on CUDA with keys split over several programs (batches too small to fill the GPU
    # otherwise): RoPE and the KV store inside the attention kernel (paged_decode_rope), one launch
    # fewer per layer and the cache read before the PDL wait. Larger batches keep rope_store_kv and
    # paged_decode, whose kernel needs half the registers: on an H100 the fused kernel was 2-4%
    # slower from 64 sequences of 2,048 keys (scripts/attn_gpu.py). Benchmarks switch it off
    # (False) or on for every decode step ("always").
    fuse_rope_decode: bool | str = True

    def forward_rope(self, layer: int, qk: torch.Tensor, v: torch.Tensor, rope, meta: PagedMeta) -> torch.Tensor:
        """forward() of q = qk[:, :H] and k = qk[:, H:] not yet rotated: on CUDA one kernel
        rotates q in place and stores the rotated k with v (rope: fastllm.models.llama.Rope), or, in
        decode steps, the attention kernel does both on the way."""
        H = self.spec.num_heads
        # a subclass with its own forward() (plugins/fastllm-flash-attn) attends its own way
        if self._kernels is None or type(self).forward is not PagedAttention.forward:
            qk = rope(qk)
            return self.forward(layer, qk[:, :H], qk[:, H:], v, meta)
        kc, vc = self.kv[layer, 0], self.kv[layer, 1]
        if meta.decode_only and self.fuse_rope_decode and (meta.num_splits > 1 or self.fuse_rope_decode == "always"):
            out = qk.new_empty(qk.shape[0], H, qk.shape[2])
            self._kernels.paged_decode_rope(qk, v, kc, vc, meta.block_tables, meta.seq_lens, meta.slot_mapping,
                                            rope.positions, rope.inv_freq, rope.scaling, self.spec.scale, out,
                                            meta.num_splits, meta.decode_scratch)
            return out
        self._kernels.rope_store_kv(qk, v, kc, vc, meta.slot_mapping, rope.positions, rope.inv_freq, rope.scaling, H)
        return self._attend(qk[:, :H], kc, vc, meta)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: PagedMeta) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D]
        kc, vc = self.kv[layer, 0], self.kv[layer, 1]  # [NB, bs, KVH, D]
        if self._kernels is not None:
            self._kernels.store_kv(k, v, kc, vc, meta.slot_mapping)
            return self._attend(q, kc, vc, meta)
        return self._forward_cpu(q, k, v, kc, vc, meta)

    def _attend(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: PagedMeta) -> torch.Tensor:
        """The kernels' attention of q [T, H, D] over the cache, this step's K/V already stored."""
        ops, scale = self._kernels, self.spec.scale
        out = torch.empty_like(q)
        if meta.decode_only:
            ops.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens, scale, out, meta.num_splits,
                             meta.decode_scratch)
        else:
            ops.paged_prefill(q, kc, vc, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, scale, out,
                              meta.max_query_len)
        return out

    def _forward_cpu(self, q, k, v, kc, vc, meta: PagedMeta) -> torch.Tensor:
        kvh, d = kc.shape[2], kc.shape[3]
        kc, vc = kc.view(-1, kvh, d), vc.view(-1, kvh, d)  # [slots, KVH, D]
        kc.index_copy_(0, meta.slot_mapping, k.to(self.kv_dtype))
        vc.index_copy_(0, meta.slot_mapping, v.to(self.kv_dtype))
        keys = kc.index_select(0, meta.key_slots.view(-1))  # [keys read, KVH, D]
        vals = vc.index_select(0, meta.key_slots.view(-1))
        if meta.decode_only:  # one query per sequence: one attention over the padded batch
            B, S = meta.key_slots.shape
            kk = keys.view(B, S, kvh, d).transpose(1, 2)  # [B, KVH, S, D]
            vv = vals.view(B, S, kvh, d).transpose(1, 2)
            o_ = F.scaled_dot_product_attention(q[:, :, None].to(self.kv_dtype), kk, vv, attn_mask=meta.key_mask,
                                                scale=self.spec.scale, enable_gqa=True)  # [B, H, 1, D]
            return o_[:, :, 0].to(q.dtype)
        out = torch.empty_like(q)
        o = b = 0
        for n, L in zip(meta.query_lens, meta.context_lens):
            s = L - n  # keys already cached before this step
            qq = q[o:o + n].transpose(0, 1)[None].to(self.kv_dtype)  # [1, H, n, D]
            kk = keys[b:b + L].transpose(0, 1)[None]  # [1, KVH, L, D]
            vv = vals[b:b + L].transpose(0, 1)[None]
            mask, causal = None, False
            if n > 1 and s == 0:
                causal = True
            elif n > 1:  # a chunk after cached tokens: query i sees keys <= s + i
                mask = torch.arange(L)[None, :] <= (s + torch.arange(n))[:, None]
            o_ = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=causal,
                                                scale=self.spec.scale, enable_gqa=True)
            out[o:o + n] = o_[0].transpose(0, 1)
            o += n
            b += L
        return out

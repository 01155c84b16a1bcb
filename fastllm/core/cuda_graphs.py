"""CUDA graphs of the decode forward, captured once for a ladder of batch sizes.

A decode step launches hundreds of small kernels; replaying a graph turns them into one
launch. Inputs and attention metadata live in static buffers that each step copies into;
padded rows get slot -1 (the KV store skips them) and seq_len 0 (attention writes zeros).
The graph ends with the LM head (every row of a decode step samples); the sampler, whose
options change per request, stays outside.
"""
from __future__ import annotations

import bisect
import time

import torch
from torch import nn

from ..models.context import ForwardContext


def ladder(max_bs: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to 512 and every 32 above (a batch
    replays the smallest graph that holds it, padding at most 15 or 31 rows), and max_bs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, min(max_bs, 512), 16))
    sizes += list(range(512, max_bs, 32)) + [max_bs]
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: nn.Module, attention, device: torch.device, max_bs: int, max_blocks: int,
                 hidden_size: int, dtype: torch.dtype):
        self.model, self.attention, self.device = model, attention, device
        self.sizes = ladder(max_bs)
        self.max_bs = self.sizes[-1]
        z = dict(device=device)
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, **z)
        self.positions = torch.zeros(max_bs, dtype=torch.long, **z)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, **z)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, **z)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, **z)
        self.cu_seqlens_q = torch.arange(max_bs + 1, dtype=torch.int32, **z)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.metas: dict[int, object] = {}
        self.capture_seconds = 0.0
        # Every graph writes its logits into this one buffer: a graph's own output tensor would stay
        # allocated in the shared pool, and those add up over the ladder (up to 1,024 rows of a
        # 128k vocabulary in fp32: about 11 GB summed, against 0.5 GB for one shared buffer).
        self.logits: torch.Tensor | None = None

    def _meta(self, bs: int):
        return self.attention.decode_meta(self.slot_mapping[:bs], self.block_tables[:bs], self.seq_lens[:bs],
                                          self.cu_seqlens_q[:bs + 1])

    def _forward(self, bs: int, ctx: ForwardContext) -> torch.Tensor:
        return self.model.compute_logits(self.model(self.input_ids[:bs], self.positions[:bs], ctx))

    @torch.inference_mode()
    def capture(self) -> None:
        t = time.perf_counter()
        pool = None
        stream = torch.cuda.Stream(self.device)
        for bs in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool
            meta = self._meta(bs)
            self.metas[bs] = meta  # keeps its scratch alive as long as the graph
            ctx = ForwardContext(self.attention, meta, None)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up compiles every Triton kernel outside the capture
                    logits = self._forward(bs, ctx)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self.logits is None:  # the largest graph comes first
                self.logits = torch.empty(self.max_bs, *logits.shape[1:], dtype=logits.dtype, device=self.device)
            del logits
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(bs, ctx)
                self.logits[:bs].copy_(logits)
            del logits  # its memory goes back to the pool for the next (smaller) capture
            pool = graph.pool()
            self.graphs[bs] = (graph, self.logits[:bs])
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - t

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor | None:
        """Logits [B, V] of a decode-only step of B <= max_bs sequences (one row each), by replay;
        None when it does not apply."""
        bs = input_ids.shape[0]
        if not meta.decode_only or bs > self.max_bs:
            return None
        gbs = self.sizes[bisect.bisect_left(self.sizes, bs)]
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        self.slot_mapping[:bs].copy_(meta.slot_mapping)
        self.seq_lens[:bs].copy_(meta.seq_lens)
        w = meta.block_tables.shape[1]
        self.block_tables[:bs, :w].copy_(meta.block_tables)
        if gbs > bs:
            self.slot_mapping[bs:gbs].fill_(-1)
            self.seq_lens[bs:gbs].zero_()
        graph, out = self.graphs[gbs]
        graph.replay()
        return out[:bs]

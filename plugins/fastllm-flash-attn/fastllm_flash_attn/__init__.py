"""`attention="flash-attn"`: fastllm's paged KV cache, attention by flash-attn's paged kernels."""
from __future__ import annotations

import torch

from fastllm.errors import ConfigError
from fastllm.stages.attention.paged import PagedAttention, PagedMeta
from fastllm.stages.base import KVSpec


def flash_attn_module():
    """flash_attn, or a ConfigError saying how to get it."""
    try:
        import flash_attn
    except ImportError as e:
        raise ConfigError("attention='flash-attn' needs the flash-attn package (>= 2.6, built for your "
                          "CUDA; PyPI has no wheel): pip install flash-attn --no-build-isolation. "
                          "attention='paged' needs nothing extra") from e
    return flash_attn


class FlashAttention(PagedAttention):
    api_version = 1

    def __init__(self, block_size: int = 256, **options):
        super().__init__(block_size=block_size, **options)

    def setup(self, spec: KVSpec) -> None:
        if spec.device.type != "cuda":
            raise ConfigError("attention='flash-attn' runs on CUDA only; use attention='paged' on the CPU")
        if self.block_size % 256:
            raise ConfigError(f"flash-attn's paged kernels need a block_size that is a multiple of 256, "
                              f"got {self.block_size}")
        self.fa = flash_attn_module()
        super().setup(spec)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: PagedMeta) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KVH, D]; the cache per layer: [num_blocks, block_size, KVH, D]
        kc, vc = self.kv[layer, 0], self.kv[layer, 1]
        self._kernels.store_kv(k, v, kc, vc, meta.slot_mapping)
        if meta.decode_only:
            out = self.fa.flash_attn_with_kvcache(q[:, None], kc, vc, cache_seqlens=meta.seq_lens,
                                                  block_table=meta.block_tables, softmax_scale=self.spec.scale,
                                                  causal=True)  # [B, 1, H, D]
            return out[:, 0]
        cu_k = torch.nn.functional.pad(meta.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        return self.fa.flash_attn_varlen_func(q, kc, vc, meta.cu_seqlens_q, cu_k, meta.max_query_len,
                                              meta.max_seq_len, softmax_scale=self.spec.scale, causal=True,
                                              block_table=meta.block_tables)

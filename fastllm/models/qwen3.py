"""Qwen3: the Llama layout with an RMSNorm on each query and key head before RoPE."""
from __future__ import annotations

import torch

from .llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, RMSNorm


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__(cfg, layer_idx, qkv_bias, o_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        H = self.num_heads
        return torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_cls = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3Model

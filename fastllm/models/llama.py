"""Llama family: Llama 2/3 (llama3 RoPE scaling), Mistral, Qwen2 (qkv bias), SmolLM.

Written for flat variable-length batches: every tensor is [T, ...] where T is the number of
tokens of all sequences in the step; attention goes through the backend that owns the KV cache.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, UnsupportedModelError
from .context import ForwardContext

# HF checkpoint names that fold into one fused parameter: name -> (fused name, shard index)
PACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


_FUSED = None


def fused_ops(x: torch.Tensor):
    """fastllm.kernels.fused for CUDA tensors when Triton is there, else None (torch ops)."""
    global _FUSED
    if not x.is_cuda:
        return None
    if _FUSED is None:
        try:
            from ..kernels import fused
            _FUSED = fused
        except ImportError:
            _FUSED = False
    return _FUSED or None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with a residual: (norm(x + residual), x + residual) in one pass."""
        fused = fused_ops(x)
        if fused is not None:
            if residual is None:
                return fused.rms_norm(x, self.weight, self.eps)
            residual = residual.contiguous()
            return fused.rms_norm(x, self.weight, self.eps, residual), residual
        if residual is not None:
            residual = x + residual
            x = residual
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)


def rope_parameters(cfg) -> dict:
    """RoPE settings across transformers 4.x (rope_theta, rope_scaling) and 5.x (rope_parameters)."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(cfg, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


class Rotary(nn.Module):
    """cos/sin for the given positions, computed per step (no table of max_position rows)."""

    def __init__(self, cfg, head_dim: int):
        super().__init__()
        self.cfg, self.head_dim = cfg, head_dim
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.scaling = 1.0

    def init_buffers(self) -> None:
        p = rope_parameters(self.cfg)
        kind = p["rope_type"]
        if kind == "default":
            d = self.head_dim
            inv = 1.0 / (p["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float) / d))
            scaling = 1.0
        elif kind in ("llama3", "linear", "yarn"):
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv, scaling = ROPE_INIT_FUNCTIONS[kind](self.cfg, device=torch.device("cpu"))
        else:
            raise UnsupportedModelError(
                f"RoPE type {kind!r} is not supported by fastllm's model code "
                "(supported: default, linear, llama3, yarn); use loader='transformers'"
            )
        self.inv_freq = inv.float().to(self.inv_freq.device)
        self.scaling = float(scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> "Rope":
        return Rope(positions, self.inv_freq, self.scaling, dtype)


class Rope:
    """RoPE at one step's positions: rope(x) rotates x [T, heads, D] (in place on CUDA). An
    attention backend may apply it itself (positions, inv_freq, scaling), fused with its KV store."""

    def __init__(self, positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
        self.positions, self.inv_freq, self.scaling = positions, inv_freq, scaling
        self._fused = fused_ops(positions)
        if self._fused is None:
            freqs = positions[:, None].float() * inv_freq[None, :]  # [T, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
            self._cos, self._sin = (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            return self._fused.rotary_(x, self.positions, self.inv_freq, self.scaling)
        return apply_rotary(x, self._cos, self._sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, D]; rotate_half convention of HF checkpoints
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=o_bias)

    def qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        return qk  # [T, H + KVH, D]; Qwen3 normalises each head here

    def forward(self, x: torch.Tensor, rope, ctx: ForwardContext) -> torch.Tensor:
        return self.attend(self.qkv_proj(x), rope, ctx)

    def attend(self, qkv: torch.Tensor, rope, ctx: ForwardContext) -> torch.Tensor:
        """o_proj(attention(q, k, v)) from the fused projection qkv [T, (H + 2*KVH) * D]."""
        T, H = qkv.shape[0], self.num_heads
        qkv = qkv.view(T, -1, self.head_dim)  # [T, H + 2*KVH, D]
        # q and k heads are adjacent: one rotary pass covers both
        qk, v = self.qk_norm(qkv[:, :H + self.num_kv_heads]), qkv[:, H + self.num_kv_heads:]
        fused = getattr(ctx.attention, "forward_rope", None)  # RoPE inside the backend's KV store
        if fused is not None:
            o = fused(self.layer_idx, qk, v, rope, ctx.meta)
        else:
            qk = rope(qk)
            o = ctx.attention.forward(self.layer_idx, qk[:, :H], qk[:, H:], v, ctx.meta)  # [T, H, D]
        return self.o_proj(o.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"activation {act!r} is not supported (only 'silu')")
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=bias)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """down_proj(silu(gate) * up) from gate_up [T, 2 * inter]."""
        fused_down = getattr(self.down_proj, "forward_silu_mul", None)  # one kernel at batch 1 (DecodeLinear)
        out = fused_down(gate_up) if fused_down is not None else None
        if out is not None:
            return out
        fused = fused_ops(gate_up)
        if fused is not None:
            return self.down_proj(fused.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, cfg, layer_idx: int, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer_idx, qkv_bias, o_bias)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, rope, ctx: ForwardContext):
        """Returns (this layer's MLP output, the residual stream before adding it): the add is
        fused into the next RMSNorm."""
        attn = self.self_attn
        qkv, residual = normed_linear(attn.qkv_proj, self.input_layernorm, h, residual)
        h = attn.attend(qkv, rope, ctx)
        gate_up_proj = self.mlp.gate_up_proj
        glu_fits = getattr(gate_up_proj, "glu_fits", None)
        if glu_fits is not None and glu_fits(h):
            # SiLU-and-mul in gate_up_proj's own kernel (one token, a quantized layer on the CUDA GEMV)
            x, residual = add_norm(self.post_attention_layernorm, h, residual)
            return self.mlp.down_proj(gate_up_proj.forward_glu(x)), residual
        gate_up, residual = normed_linear(gate_up_proj, self.post_attention_layernorm, h, residual)
        return self.mlp.down(gate_up), residual


def normed_linear(linear: nn.Module, norm: RMSNorm, h: torch.Tensor, residual: torch.Tensor | None):
    """(linear(norm(h + residual)), h + residual); one kernel where the linear can fuse the norm
    (DecodeLinear at batch 1), else the fused RMSNorm and then the linear."""
    fused = getattr(linear, "forward_normed", None)
    out = fused(h, residual, norm.weight, norm.eps) if fused is not None else None
    if out is not None:
        return out
    x, residual = add_norm(norm, h, residual)
    return linear(x), residual


def add_norm(norm: RMSNorm, h: torch.Tensor, residual: torch.Tensor | None):
    """(norm(h + residual), h + residual), or (norm(h), h) without a residual."""
    return (norm(h), h) if residual is None else norm(h, residual)


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, cfg, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            self.layer_cls(cfg, i, qkv_bias, o_bias) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg, self.layers[0].self_attn.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rotary(positions, h.dtype)
        residual = None
        for layer in self.layers:
            h, residual = layer(h, residual, rope, ctx)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    """Llama, Mistral, Qwen2 and SmolLM checkpoints (HF parameter names)."""

    model_cls = LlamaModel

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        qwen2 = cfg.model_type == "qwen2"
        attn_bias = bool(getattr(cfg, "attention_bias", False))
        # Qwen2 has biases on q/k/v but not on o_proj; Llama's attention_bias covers all four.
        self.model = self.model_cls(cfg, qkv_bias=attn_bias or qwen2, o_bias=attn_bias and not qwen2)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with lm_head (one Parameter, as HF does) when the config ties them."""
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def attn_shape(self) -> tuple[int, int, int, int]:
        """(layers, query heads, kv heads, head dim): what the attention backend works with."""
        a = self.model.layers[0].self_attn
        return len(self.model.layers), a.num_heads, a.num_kv_heads, a.head_dim

    def init_buffers(self) -> None:
        """Compute non-persistent buffers after the parameters left the meta device."""
        self.model.rotary.init_buffers()
        self.tie_weights()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, V]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors into (fused) parameters; returns the parameter names filled."""
        params = dict(self.named_parameters())
        filled: set[str] = set()
        shards: dict[str, set[int]] = {}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target, shard = name, None
            for hf, (fused, idx) in PACKED.items():
                if f".{hf}." in name:
                    target, shard = name.replace(f".{hf}.", f".{fused}."), idx
                    break
            if target not in params:
                raise CheckpointError(f"checkpoint tensor {name!r} has no parameter in {type(self).__name__}")
            p = params[target]
            dst = p.data if shard is None else self._shard(target, p.data, shard)
            if tuple(dst.shape) != tuple(tensor.shape):
                raise CheckpointError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, model expects {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            if shard is None:
                filled.add(target)
            else:
                shards.setdefault(target, set()).add(shard)
        for target, got in shards.items():
            if len(got) == (3 if "qkv_proj" in target else 2):
                filled.add(target)
        return filled

    def checkpoint_names(self, param: str) -> list[str]:
        """The HF checkpoint tensor names that fill `param` (three for qkv_proj, two for gate_up_proj)."""
        names = [param.replace(f".{fused}.", f".{hf}.") for hf, (fused, _) in PACKED.items() if f".{fused}." in param]
        return names or [param]

    def _shard(self, target: str, data: torch.Tensor, idx: int) -> torch.Tensor:
        if "qkv_proj" in target:
            a = self.model.layers[0].self_attn
            sizes = [a.q_size, a.kv_size, a.kv_size]
        else:
            sizes = [data.shape[0] // 2] * 2
        start = sum(sizes[:idx])
        return data.narrow(0, start, sizes[idx])

"""Activation-aware int4 (AWQ-style): the per-input-channel scale each layer is quantized with
(`search_input_scale`), and moving the matching division of its inputs into the layer that
produces them (`fold_into_producers`), so it costs nothing at run time."""
from __future__ import annotations

import torch
from torch import nn

from . import is_sparse
from .int4 import dequantize_int4, quantize_int4


def fold_into_producers(model: nn.Module, scale_of: dict[int, torch.Tensor]) -> set[int]:
    """Divide the rows that produce down_proj's input (gate_up_proj's up half: down_proj reads
    silu(gate) * up) and, where every query head has its own value head, o_proj's (qkv_proj's
    value rows: attention is linear in the values) by those layers' input scales (scale_of:
    {id(layer): s}). Returns the ids of the layers whose division is now in the producer. Scaling
    a row by a positive constant commutes with int4's per-row quantization, so the producers
    quantize to the same values, scaled. (With grouped value heads o_proj keeps its division:
    query heads sharing a value head would need one scale.)"""
    folded: set[int] = set()
    with torch.no_grad():
        for block in getattr(getattr(model, "model", model), "layers", []):
            mlp, attn = getattr(block, "mlp", None), getattr(block, "self_attn", None)
            down, gate_up = getattr(mlp, "down_proj", None), getattr(mlp, "gate_up_proj", None)
            if id(down) in scale_of and _plain(gate_up) and gate_up.out_features == 2 * down.in_features:
                _scale_rows(gate_up, down.in_features, down.in_features, scale_of[id(down)])
                folded.add(id(down))
            o, qkv = getattr(attn, "o_proj", None), getattr(attn, "qkv_proj", None)
            if (id(o) in scale_of and _plain(qkv) and getattr(attn, "num_heads", 0) == getattr(attn, "num_kv_heads", -1)
                    and qkv.out_features == attn.q_size + 2 * attn.kv_size and o.in_features == attn.kv_size):
                _scale_rows(qkv, attn.q_size + attn.kv_size, attn.kv_size, scale_of[id(o)])
                folded.add(id(o))
    return folded


def _plain(layer) -> bool:
    return type(layer) is nn.Linear and not is_sparse(layer.weight)


def _scale_rows(layer: nn.Linear, start: int, count: int, s: torch.Tensor) -> None:
    """Rows start .. start + count of layer (weight and bias) divided by s [count]."""
    inv = 1.0 / s.float().to(layer.weight.device)
    layer.weight[start:start + count].mul_(inv.to(layer.weight.dtype)[:, None])
    if layer.bias is not None:
        layer.bias[start:start + count].mul_(inv.to(layer.bias.dtype))


def search_input_scale(weight: torch.Tensor, x: torch.Tensor, group_size: int, grid: int = 11) -> torch.Tensor | None:
    """The s = mean|x|^a (normalised to geometric mean 1) that minimises |x W^T - (x / s) Q(W s)^T|^2
    on the calibration inputs x [T, K]; None when a = 0 (plain rounding) is best."""
    w = weight.detach().float()
    x = x.to(w.device, torch.float32)
    ref = x @ w.T
    act = x.abs().mean(dim=0).clamp(min=1e-5)
    best, best_err = None, None
    for i in range(grid):
        a = i / (grid - 1)
        s = act.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        wq = dequantize_int4(*quantize_int4(w * s[None, :], group_size), w.shape[1]) / s[None, :]
        err = (x @ wq.T - ref).pow(2).mean().item()
        if best_err is None or err < best_err:
            best, best_err = (None if a == 0 else s), err
    return best

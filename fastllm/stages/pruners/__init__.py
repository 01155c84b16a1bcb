"""Pruners: model transforms that zero weights of the decoder's linear layers.

- `magnitude`: unstructured, the smallest |w| per layer, per output row, or over the whole model;
- `wanda`: unstructured, the smallest |w| * ||x_j||_2 per output row, x_j being input feature j
  over a calibration text (Sun et al. 2023, arXiv 2306.11695), layer by layer;
- `2:4`: two of every four consecutive weights of a row zeroed, chosen by either score; on CUDA
  stored with torch's semi-structured sparse tensors, elsewhere as a masked dense weight.

Pruned weights stay zero through the quantizers (int8 and fp8 map 0 to 0; int4's zero point maps
0 back to 0). The LM head is skipped by default (`skip`), embeddings are never pruned.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ...errors import ConfigError
from ..quantizers import linears

log = logging.getLogger("fastllm")


def check_sparsity(owner: str, sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"{owner}: sparsity is the fraction of weights zeroed, in [0, 1), got {sparsity!r}")
    return float(sparsity)


def prunable(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every plain nn.Linear not matching `skip`, in model order."""
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(child)], child) for _, _, child in linears(model, skip)]


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask [N, K]: False at the floor(K * sparsity) smallest scores of every row."""
    k = int(score.shape[1] * sparsity)
    mask = torch.ones_like(score, dtype=torch.bool)
    if k:
        idx = torch.topk(score, k, dim=1, largest=False).indices
        mask.scatter_(1, idx, False)
    return mask


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask: False at the floor(numel * sparsity) smallest scores of the whole matrix."""
    k = int(score.numel() * sparsity)
    mask = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        mask[torch.topk(score.reshape(-1), k, largest=False).indices] = False
    return mask.view(score.shape)


def nm_mask(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep-mask with n of every m consecutive columns of a row zeroed (the n smallest scores)."""
    N, K = score.shape
    if K % m:
        raise ConfigError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {K}")
    groups = score.reshape(N, K // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    return torch.ones_like(groups, dtype=torch.bool).scatter_(2, idx, False).view(N, K)


def global_threshold(scores: list[torch.Tensor], sparsity: float) -> float:
    """The score below which the floor(total * sparsity) smallest of all `scores` lie, found by
    bisection on counts (no concatenated copy of every weight)."""
    total = sum(s.numel() for s in scores)
    k = int(total * sparsity)
    if k == 0:
        return -math.inf
    lo = min(s.min().item() for s in scores)
    hi = max(s.max().item() for s in scores)
    for _ in range(64):  # count(score <= mid) >= k is monotone in mid
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if sum(int((s <= mid).sum()) for s in scores) >= k:
            hi = mid
        else:
            lo = mid
    return hi


@torch.no_grad()
def apply_mask(layer: nn.Linear, mask: torch.Tensor) -> None:
    layer.weight.mul_(mask.to(layer.weight.dtype))


def report(model: nn.Module, layers: list[nn.Linear], what: str) -> float:
    """Fraction of exact zeros over `layers` (before any sparse storage); logged, and kept as
    `model.fastllm_sparsity`."""
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    total = sum(layer.weight.numel() for layer in layers)
    model.fastllm_sparsity = zeros / max(total, 1)
    log.info("%s: %.1f%% of %d weights in %d linear layers are zero", what, 100 * model.fastllm_sparsity, total,
             len(layers))
    return model.fastllm_sparsity


def input_norms(model: nn.Module, layers: list[nn.Linear], ids: list[int], device, dtype) -> list[torch.Tensor]:
    """||x_j||_2 over the calibration tokens, per input feature j, for each of `layers`."""
    from ..quantizers import capture_inputs

    return [x.pow(2).sum(dim=0).sqrt() for x in capture_inputs(model, layers, ids, device, dtype)]

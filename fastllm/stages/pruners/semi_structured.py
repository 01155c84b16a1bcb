"""`pruner="2:4"`: semi-structured sparsity, two of every four consecutive weights of a row zeroed
(by |w|, or by Wanda's |w| * ||x||), the pattern that NVIDIA's sparse tensor cores run.

Storage (`storage`): "sparse" keeps each pruned weight as a torch semi-structured sparse tensor
(cuSPARSELt or CUTLASS kernels; CUDA only), "masked" as a dense weight with zeros (any device;
no faster, the quality cost only). "auto" is sparse on Ampere (compute capability 8.x) and
masked elsewhere: on an H100 with torch 2.11, CUTLASS' sparse kernels refuse to run and
cuSPARSELt's product cost 470-610 us per call whatever the shape (descriptor set-up on every
call, pytorch/pytorch#153825), so a 2:4 Llama-2-7B decoded at 0.44x dense speed at batch 1 and
0.63x at batch 64 (scripts/sparse_gpu.py, 2026-11-27). A sparse weight cannot be quantized
afterwards: combining it with a quantizer is refused.
"""
from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError
from ..base import LoadContext
from ..quantizers import check_skip
from . import apply_mask, nm_mask, prunable, report
from .wanda import wanda_scores

# torch's minimum shapes for 16-bit semi-structured weights (rows, cols multiples): cuSPARSELt
# (16, 16), CUTLASS (32, 64); FIELD-NOTES.md section 6
_MIN_ROWS, _MIN_COLS = 32, 64


def sparse_supported(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def sparse_by_default(device: torch.device) -> bool:
    """Where storage="auto" picks sparse storage: Ampere (see the module docstring for Hopper)."""
    return sparse_supported(device) and torch.cuda.get_device_capability(device)[0] == 8


class SemiSparseLinear(nn.Linear):
    """nn.Linear over a semi-structured sparse weight. torch's sparse product returns a transposed
    view; the model's fused kernels (RoPE + KV store) read rows with unit stride, so it is copied."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).contiguous()


def to_sparse(layer: nn.Linear, backend: str = "auto") -> None:
    """Swap the (already 2:4-pruned) weight for its semi-structured sparse form, in place.
    backend: "cusparselt", "cutlass", or "auto" (CUTLASS on Ampere; cuSPARSELt on Hopper and
    later, where torch 2.11's CUTLASS sparse kernels refuse to run: measured on an H100)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend == "auto":
        backend = "cusparselt" if torch.cuda.get_device_capability(layer.weight.device) >= (9, 0) else "cutlass"
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach().contiguous()), requires_grad=False)
    layer.__class__ = SemiSparseLinear


class SemiStructuredPruner:
    """`{"name": "2:4", "score": "magnitude" | "wanda", "storage": "auto" | "sparse" | "masked"}`;
    `backend` picks torch's sparse kernels ("auto", "cusparselt", "cutlass"); Wanda's options (`calibration_tokens`, `calibration_file`, `sequential`) apply with
    score="wanda"; `skip` as for every pruner."""

    api_version = 1

    def __init__(self, score: str = "magnitude", storage: str = "auto", backend: str = "auto", calibration_tokens: int = 512,
                 calibration_file: str | None = None, sequential: bool = True,
                 skip: list[str] | tuple[str, ...] = ("lm_head",)):
        if score not in ("magnitude", "wanda"):
            raise ConfigError(f"2:4 pruner: score is 'magnitude' or 'wanda', got {score!r}")
        if storage not in ("auto", "sparse", "masked"):
            raise ConfigError(f"2:4 pruner: storage is 'auto', 'sparse' or 'masked', got {storage!r}")
        if backend not in ("auto", "cusparselt", "cutlass"):
            raise ConfigError(f"2:4 pruner: backend is 'auto', 'cusparselt' or 'cutlass', got {backend!r}")
        self.score, self.storage, self.backend = score, storage, backend
        self.tokens, self.path, self.sequential = calibration_tokens, calibration_file, bool(sequential)
        self.skip = check_skip("2:4 pruner", skip)

    def apply(self, model: nn.Module, ctx: LoadContext) -> nn.Module:
        named = prunable(model, self.skip)
        for name, layer in named:
            if layer.in_features % 4:
                raise ConfigError(f"2:4 pruner: {name} has in_features={layer.in_features}, not a multiple of 4; "
                                  f"add it to skip")
        sparse = self.storage == "sparse" or (self.storage == "auto" and sparse_by_default(ctx.device))
        if sparse and not sparse_supported(ctx.device):
            raise ConfigError(f"2:4 pruner: storage='sparse' needs a CUDA GPU of compute capability 8.0+ "
                              f"(the device is {ctx.device}); use storage='masked'")
        prune = lambda layer, score: apply_mask(layer, nm_mask(score, 2, 4))  # noqa: E731
        if self.score == "wanda":
            wanda_scores(model, ctx, self.skip, self.tokens, self.path, self.sequential, prune)
        else:
            for _, layer in named:
                prune(layer, layer.weight.detach().abs().float())
        report(model, [layer for _, layer in named], f"2:4 pruner ({self.score})")
        if sparse:
            for name, layer in named:
                out_f, in_f = layer.weight.shape
                if out_f % _MIN_ROWS or in_f % _MIN_COLS or layer.weight.dtype not in (torch.float16, torch.bfloat16):
                    continue  # torch's sparse kernels refuse this shape or dtype: it stays masked
                to_sparse(layer, self.backend)
        return model

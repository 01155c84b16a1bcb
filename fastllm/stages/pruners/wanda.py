"""`pruner="wanda"`: unstructured pruning by |w| * ||x||, calibrated on a text (Wanda, Sun et al.
2023, arXiv 2306.11695): within each output row, the weights whose score |w_ij| * ||x_j||_2 (x_j:
input feature j over the calibration tokens) is smallest are zeroed. No weight is updated.

Layer by layer (`sequential`, as the paper's code does): the inputs of decoder layer i are taken
from the model whose layers before i are already pruned, so each layer is fitted to what it
will really see. Linears fused by fastllm (q/k/v, gate/up) share one statistic, as in the paper.
"""
from __future__ import annotations

from torch import nn

from ...errors import ConfigError
from ..base import LoadContext
from ..quantizers import calibration_ids, check_skip
from . import apply_mask, check_sparsity, input_norms, prunable, report, row_mask


def wanda_scores(model: nn.Module, ctx: LoadContext, skip: tuple[str, ...], tokens: int, path: str | None,
                 sequential: bool, prune) -> None:
    """Call prune(layer, score) for every prunable linear, scores from calibration activations;
    with `sequential`, one decoder layer at a time after the ones before it are pruned."""
    ids = calibration_ids(ctx, tokens, path)
    named = prunable(model, skip)
    decoder = getattr(getattr(model, "model", model), "layers", None)
    if sequential and decoder is not None:
        groups = []
        for block in decoder:
            inside = {id(m) for m in block.modules()}
            groups.append([layer for _, layer in named if id(layer) in inside])
        in_blocks = {id(layer) for g in groups for layer in g}
        rest = [layer for _, layer in named if id(layer) not in in_blocks]  # outside the decoder: at the end
        groups = [g for g in groups if g] + ([rest] if rest else [])
    else:
        groups = [[layer for _, layer in named]]
    for group in groups:
        norms = input_norms(model, group, ids, ctx.device, ctx.dtype)
        for layer, norm in zip(group, norms):
            prune(layer, layer.weight.detach().abs().float() * norm[None, :])


class WandaPruner:
    """`{"name": "wanda", "sparsity": 0.5}`: zero `sparsity` of every output row by Wanda's score.
    Options: `calibration_tokens` (512), `calibration_file` (default: the last tokens of Python's
    pydoc topics, which `fastllm eval perplexity` never scores), `sequential` (True), `skip`."""

    api_version = 1

    def __init__(self, sparsity: float = 0.5, calibration_tokens: int = 512, calibration_file: str | None = None,
                 sequential: bool = True, skip: list[str] | tuple[str, ...] = ("lm_head",)):
        self.sparsity = check_sparsity("wanda pruner", sparsity)
        if not isinstance(calibration_tokens, int) or calibration_tokens < 16:
            raise ConfigError(f"wanda pruner: calibration_tokens must be an int >= 16, got {calibration_tokens!r}")
        self.tokens, self.path, self.sequential = calibration_tokens, calibration_file, bool(sequential)
        self.skip = check_skip("wanda pruner", skip)

    def apply(self, model: nn.Module, ctx: LoadContext) -> nn.Module:
        if self.sparsity > 0:
            wanda_scores(model, ctx, self.skip, self.tokens, self.path, self.sequential,
                         lambda layer, score: apply_mask(layer, row_mask(score, self.sparsity)))
        report(model, [layer for _, layer in prunable(model, self.skip)], "wanda pruner")
        return model


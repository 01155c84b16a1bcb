"""Weight-only quantizers: model transforms that swap nn.Linear layers for quantized ones."""
from __future__ import annotations

import fnmatch

from torch import nn


def linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every plain nn.Linear whose name matches none of `skip`."""
    out = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            if type(child) is nn.Linear and not any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(name, p)
                                                    for p in skip):
                out.append((parent, name, child))
    return out


def calibration_ids(ctx, num_tokens: int, path: str | None = None) -> list[int]:
    """Token ids of a calibration text: `path`, or Python's pydoc topics (fastllm.eval.default_text),
    tokenized with the loaded model's tokenizer; its last `num_tokens` (fastllm eval perplexity
    scores a text's first tokens, so calibrating and scoring on the default text never overlap)."""
    from ...errors import ConfigError
    from ...eval import default_text

    if ctx.text_tokenizer is None:
        raise ConfigError("calibrating on text needs the model's tokenizer; this model has none "
                          "(the dummy loader): turn activation-aware calibration off")
    if path is None:
        text, _ = default_text()
    else:
        try:
            text = open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the calibration text {path!r}: {e}") from e
    ids = ctx.text_tokenizer(text, add_special_tokens=False)["input_ids"][-num_tokens:]
    if len(ids) < 16:
        raise ConfigError(f"the calibration text has {len(ids)} tokens; at least 16 are needed")
    return ids


def capture_inputs(model: nn.Module, layers: list[nn.Module], ids: list[int], device, dtype) -> list:
    """Run `model` (fastllm's model interface) once over `ids` and return the input [T, K] (fp32)
    that each of `layers` saw."""
    import torch

    from ...core.request import Batch, Request
    from ...models.context import ForwardContext
    from ...sampling import SamplingParams
    from ..attention.paged import PagedAttention
    from ..base import KVSpec

    L, H, KVH, D = model.attn_shape
    attention = PagedAttention(kv_cache_memory=2 * L * KVH * D * 4 * (len(ids) + 64) + (1 << 20))
    attention.setup(KVSpec(L, H, KVH, D, dtype, device, D ** -0.5))
    seen: list = [None] * len(layers)

    def keep(i):
        def hook(_module, args):
            seen[i] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return hook

    handles = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(layers)]
    try:
        req = Request("calibration", None, list(ids), SamplingParams(max_tokens=1), sink=lambda _: None,
                      max_len=len(ids) + 1)
        attention.allocate(req.id, len(ids))
        batch = Batch([req], [len(ids)])
        with torch.inference_mode():
            model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device),
                  ForwardContext(attention, attention.plan(batch), batch))
    finally:
        for h in handles:
            h.remove()
    return seen

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

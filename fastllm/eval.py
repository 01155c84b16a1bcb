"""Perplexity of any engine configuration on a text: the quality cost of a stage, in one number.

The text is cut into windows of `context` tokens, each scored on its own (the first token of a
window has no context and is not scored): perplexity = exp(mean negative log-likelihood of the
scored tokens). Two configurations compare only on the same text, context and token budget.

By default the text is Python's own `pydoc_data/topics.py`, which every Python installation
has (its content changes between Python versions: compare numbers from one machine).
"""
from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    num_tokens: int  # tokens scored
    num_windows: int
    context: int
    source: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def default_text() -> tuple[str, str]:
    """(text, where it came from): pydoc's topics, present with every Python."""
    origin = importlib.util.find_spec("pydoc_data.topics").origin
    return Path(origin).read_text(encoding="utf-8"), origin


def perplexity(engine: "Engine", text: str | None = None, *, context: int = 512, max_tokens: int | None = 8192,
               source: str | None = None) -> Perplexity:
    """Perplexity of `engine` on `text` (default: default_text()) over at most `max_tokens`
    tokens (None: all of it), in windows of `context` tokens."""
    import torch

    if text is None:
        text, source = default_text()
    if engine.tokenizer is None:
        raise InvalidRequestError("perplexity needs a model with a tokenizer (the dummy loader has none)")
    if context < 2 or context > engine.max_model_len:
        raise InvalidRequestError(f"context must be in [2, {engine.max_model_len}] (the engine's max_model_len), "
                                  f"got {context}")
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise InvalidRequestError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    t = time.perf_counter()
    nll, scored, windows = 0.0, 0, 0
    for start in range(0, len(ids), context):
        window = ids[start:start + context]
        if len(window) < 2:
            break
        logits = engine.prompt_logits(window)  # [n, V] fp32
        target = torch.tensor(window[1:], device=logits.device)
        loss = torch.nn.functional.cross_entropy(logits[:-1].double(), target, reduction="sum")
        nll += loss.item()
        scored += len(window) - 1
        windows += 1
    mean = nll / scored
    return Perplexity(math.exp(mean), mean, scored, windows, context, source or "<text>", time.perf_counter() - t)

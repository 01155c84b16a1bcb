from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ForwardContext:
    """The one per-step object a model forward gets: the attention backend, its metadata for
    this step, and the batch itself (for models that keep their own per-sequence state)."""

    attention: Any
    meta: Any
    batch: Any = None

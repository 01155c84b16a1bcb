"""The stage protocols. A third-party stage implements one and registers it by entry point.

Every implementation carries `api_version = 1` (fastllm.registry.API_VERSION) and is built as
`cls(**options)` from the user's choice, e.g. `quantizer={"name": "int4", "group_size": 64}`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..core.request import Batch, Request


@dataclass
class LoadContext:
    """What start-up stages know about the target: device, dtype and user choices."""

    device: "torch.device"
    dtype: "torch.dtype"
    allow_pickle: bool = False
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "fastllm")
    progress: bool = True
    tokenizer: str | None = None
    # set once the model is loaded: its tokenizer object (or None), for transforms that
    # calibrate on text (activation-aware quantization, Wanda pruning)
    text_tokenizer: Any = None


@dataclass
class LoadedModel:
    """A loader's result: the model (fastllm's interface), its tokenizer and limits."""

    model: "nn.Module"
    tokenizer: Any  # a transformers tokenizer, or None (token-id prompts only)
    eos_token_ids: set[int]
    max_model_len: int
    name: str


@runtime_checkable
class Loader(Protocol):
    """Builds the model on ctx.device in ctx.dtype from a path or name."""

    api_version: int

    def load(self, model: str | None, ctx: LoadContext) -> LoadedModel: ...


@runtime_checkable
class ModelTransform(Protocol):
    """A start-up transform of the model (quantizer, pruner, parallelizer): swap or shard
    modules in place and return the model."""

    api_version: int

    def apply(self, model: "nn.Module", ctx: LoadContext) -> "nn.Module": ...


Quantizer = Pruner = Parallelizer = ModelTransform


@dataclass(frozen=True)
class KVSpec:
    """What an attention backend must hold per token, and how to attend."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: "torch.dtype"
    device: "torch.device"
    scale: float


@runtime_checkable
class AttentionBackend(Protocol):
    """Owns the KV cache; stores new K/V and attends for each layer of a flat batch.

    `allocate` gives a sequence room for `num_tokens` at once (static batching). A paged backend
    (attention="paged") also lets a sequence grow and share cached prefixes; a batcher that
    needs these optional methods (batcher="continuous") checks for them at setup:

    - `match_prefix(seq_id, token_ids) -> int`: start the sequence with the cached KV of its
      longest prefix of full blocks; return the tokens it covers (never the last token).
    - `reserve(seq_id, num_tokens) -> bool`: grow the sequence to hold `num_tokens`; False, with
      nothing changed, when memory is short (the batcher then preempts someone).
    - `cache_full_blocks(seq_id, token_ids, num_computed)`: after a step ran, publish the
      sequence's blocks now full of computed KV, so later prefixes can hit them.

    `free(seq_id)` gives back whatever the sequence holds, allocated or reserved."""

    api_version: int

    def setup(self, spec: KVSpec) -> None: ...
    def can_allocate(self, num_tokens: int) -> bool: ...
    def allocate(self, seq_id: str, num_tokens: int) -> None: ...
    def free(self, seq_id: str) -> None: ...
    def plan(self, batch: "Batch") -> Any: ...
    def forward(self, layer: int, q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor",
                meta: Any) -> "torch.Tensor": ...


@runtime_checkable
class Batcher(Protocol):
    """Decides which tokens of which requests run in each step."""

    api_version: int

    def setup(self, attention: AttentionBackend, max_num_seqs: int, max_num_batched_tokens: int) -> None: ...
    def add(self, request: "Request") -> None: ...
    def schedule(self) -> "Batch | None": ...
    def update(self, batch: "Batch") -> None: ...
    def finish(self, request: "Request") -> None: ...
    def has_work(self) -> bool: ...
    def requests(self) -> list["Request"]: ...


@runtime_checkable
class Speculator(Protocol):
    """Proposes draft tokens that the target model verifies in one step."""

    api_version: int
    enabled: bool

    def propose(self, requests: list["Request"]) -> dict[str, list[int]]: ...

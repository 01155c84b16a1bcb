"""What the engine returns: whole outputs and streamed chunks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class RequestMetrics:
    """Timings of one request (seconds from `time.perf_counter`)."""

    arrival_time: float
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, over the time after the first."""
        if self.first_token_time is None or self.finished_time is None:
            return None
        dt = self.finished_time - self.first_token_time
        n = self.num_generated_tokens - 1
        return n / dt if n > 0 and dt > 0 else None


@dataclass
class RequestOutput:
    """The finished result of one request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    metrics: RequestMetrics = field(repr=False, default=None)  # type: ignore[assignment]


@dataclass
class StreamChunk:
    """A delta of one request: new text and token ids; `finish_reason` is set on the last."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None

"""A request's state as the engine thread sees it, and the flat batch a step runs."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..outputs import RequestMetrics, RequestOutput
from ..sampling import SamplingParams


PENDING = -1  # a sampled token whose value is still on the device (overlapped scheduling)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One prompt being served. Mutated only by the engine thread."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, sink: Callable[[Any], None], max_len: int):
        self.id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink  # receives StreamChunk deltas (the last has finish_reason), or an exception
        self.stream = True  # False: only the last chunk is sent (generate() needs no deltas)
        self.token_ids: list[int] = list(prompt_ids)  # prompt + output
        # KV must hold every token fed to the model: all but the last sampled one
        self.max_tokens_total = min(len(prompt_ids) + params.max_tokens, max_len)
        self.num_computed = 0
        self.pending_row = 0  # row of the in-flight step's sampled ids that holds a PENDING last token
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.text = ""
        self.detokenizer: Any = None
        self.generator: Any = None
        self.metrics = RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=len(prompt_ids))

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def to_output(self) -> RequestOutput:
        return RequestOutput(self.id, self.prompt, list(self.prompt_ids), self.text,
                             self.output_ids, self.finish_reason, self.metrics)


@dataclass
class Batch:
    """One step's work: each request feeds `num_new[i]` tokens starting at its num_computed."""

    requests: list[Request]
    num_new: list[int]
    start: list[int] = field(default_factory=list)  # num_computed of each request at schedule time

    def __post_init__(self) -> None:
        if not self.start:
            self.start = [r.num_computed for r in self.requests]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def flat(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """Token ids and positions of all sequences, concatenated, and where a PENDING token
        sits: flat indices and the in-flight step's sampled rows that fill them."""
        ids: list[int] = []
        pos: list[int] = []
        dst: list[int] = []
        src: list[int] = []
        for r, s, n in zip(self.requests, self.start, self.num_new):
            if n == 1:  # a decode row
                ids.append(r.token_ids[s])
                pos.append(s)
            else:
                ids.extend(r.token_ids[s:s + n])
                pos.extend(range(s, s + n))
            if ids[-1] == PENDING:  # only a sequence's last token can be pending
                ids[-1] = 0
                dst.append(len(ids) - 1)
                src.append(r.pending_row)
        return ids, pos, dst, src

    def sampling(self) -> list[int]:
        """Indices of requests whose step reaches their last token, so they emit one."""
        return [i for i, (r, s, n) in enumerate(zip(self.requests, self.start, self.num_new))
                if s + n == len(r.token_ids)]

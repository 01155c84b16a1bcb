"""Turns what a caller passes (prompt, params, chat messages) into a validated Request.

Runs in the caller's thread, so a bad request raises there and never reaches the engine.
"""
from __future__ import annotations

import itertools
import threading
from typing import Any, Callable

import torch
from pydantic import ValidationError

from ..errors import InvalidRequestError, PromptTooLongError, describe_validation_error
from ..sampling import SamplingParams
from .detokenizer import Detokenizer
from .request import Request


class InputProcessor:
    def __init__(self, tokenizer, model_name: str, vocab_size: int, max_model_len: int,
                 kv_capacity: int | None, device: torch.device):
        self.tokenizer, self.model_name = tokenizer, model_name
        self.vocab_size, self.max_model_len, self.kv_capacity = vocab_size, max_model_len, kv_capacity
        self.device = device
        self._ids = itertools.count()
        self._lock = threading.Lock()  # HF tokenizers are not safe to share across threads

    def params(self, params: SamplingParams | dict | None) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if isinstance(params, SamplingParams):
            return params
        if isinstance(params, dict):
            try:
                return SamplingParams(**params)
            except ValidationError as e:
                raise InvalidRequestError(f"invalid sampling parameters: {describe_validation_error(e)}") from e
        raise InvalidRequestError(f"params must be SamplingParams or a dict, got {type(params).__name__}")

    def encode(self, prompt: Any, add_special_tokens: bool) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is an empty string; give at least one character")
            if self.tokenizer is None:
                raise InvalidRequestError(
                    f"{self.model_name} has no tokenizer; pass prompts as {{'prompt_token_ids': [...]}}")
            with self._lock:
                ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            if not ids:
                raise InvalidRequestError("the prompt encodes to no tokens")
            return prompt, ids
        if isinstance(prompt, dict) and set(prompt) == {"prompt_token_ids"}:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not ids or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise InvalidRequestError("prompt_token_ids must be a non-empty list of ints")
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            return None, list(ids)
        raise InvalidRequestError(
            f"a prompt must be a str or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def render_chat(self, messages: list[dict]) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(f"{self.model_name} has no chat template; use generate()")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise InvalidRequestError("messages must be a list of {'role': ..., 'content': ...} dicts")
        with self._lock:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def request(self, prompt: Any, params: Any, sink: Callable[[Any], None], add_special_tokens: bool) -> Request:
        sp = self.params(params)
        text, ids = self.encode(prompt, add_special_tokens)
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens; the context holds {self.max_model_len} "
                f"(max_model_len) and one more is needed to generate. Shorten the prompt")
        req = Request(str(next(self._ids)), text, ids, sp, sink, self.max_model_len)
        if self.kv_capacity is not None and req.max_tokens_total > self.kv_capacity:
            raise PromptTooLongError(f"prompt + max_tokens = {req.max_tokens_total} tokens exceed the "
                                     f"KV cache ({self.kv_capacity} tokens); lower max_tokens")
        if self.tokenizer is not None:
            req.detokenizer = Detokenizer(self.tokenizer, ids, sp.stop)
        if sp.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(sp.seed)
        return req

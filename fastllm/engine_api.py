"""The Engine's request API: generate, stream and chat, from threads and from asyncio tasks.

Each call validates and tokenizes in the caller's thread (Engine._make_request), hands the request
to the engine thread (Engine._submit) and waits on the request's sink: a queue.Queue for threads,
an asyncio.Queue fed through the caller's loop for tasks. Closing a stream or cancelling a task
early aborts the request (Engine.abort).
"""
from __future__ import annotations

import asyncio
import queue
from typing import AsyncIterator, Iterator, Sequence

from .core.request import Request
from .errors import InvalidRequestError
from .outputs import RequestOutput, StreamChunk
from .sampling import SamplingParams

Prompt = str | dict


class RequestAPI:
    """The public request methods of fastllm.Engine (which supplies _make_request, _submit, abort
    and inputs)."""

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | dict | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for each prompt (a str, or {'prompt_token_ids': [...]}); order is kept."""
        return self._generate(prompts, params, add_special_tokens=True)

    def _generate(self, prompts, params, add_special_tokens: bool) -> list[RequestOutput]:
        prompts = list(prompts) if isinstance(prompts, (list, tuple)) else [prompts]
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise InvalidRequestError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        done: queue.Queue = queue.Queue()
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            try:
                reqs.append(self._make_request(p, sp, done.put, add_special_tokens))
            except InvalidRequestError as e:
                raise type(e)(f"prompt {i}: {e}") from e
            reqs[-1].stream = False  # only the final chunk matters here
        for r in reqs:
            self._submit(r)
        errors, pending = [], len(reqs)
        while pending:
            item = done.get()
            if isinstance(item, BaseException):
                errors.append(item)
                pending -= 1
            elif item.finish_reason is not None:
                pending -= 1
        if errors:
            raise errors[0]
        return [r.to_output() for r in reqs]

    def stream(self, prompt: Prompt, params: SamplingParams | dict | None = None) -> Iterator[StreamChunk]:
        """Yield deltas as they are generated; the last chunk has finish_reason set.
        Closing the iterator early aborts the request."""
        return self._stream(prompt, params, True)

    def stream_chat(self, messages: list[dict], params: SamplingParams | dict | None = None) -> Iterator[StreamChunk]:
        """`stream` of the reply to a conversation (the model's chat template)."""
        return self._stream(self.render_chat(messages), params, False)

    def _stream(self, prompt, params, special: bool) -> Iterator[StreamChunk]:
        q: queue.Queue = queue.Queue()
        req = self._make_request(prompt, params, q.put, special)
        self._submit(req)
        finished = False
        try:
            while True:
                item = q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(req.id)

    def _async_request(self, prompt, params, special: bool) -> tuple[Request, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(item) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the caller's loop is gone: nobody is listening
                pass

        return self._make_request(prompt, params, sink, special), q

    async def _drain(self, req: Request, q: asyncio.Queue) -> AsyncIterator[StreamChunk]:
        self._submit(req)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:  # cancelled or closed early: free the request at once
                self.abort(req.id)

    async def astream(self, prompt: Prompt, params: SamplingParams | dict | None = None) -> AsyncIterator[StreamChunk]:
        """Async `stream`; safe inside a running event loop. Cancelling it frees the request."""
        req, q = self._async_request(prompt, params, True)
        async for chunk in self._drain(req, q):
            yield chunk

    async def agenerate(self, prompt: Prompt, params: SamplingParams | dict | None = None) -> RequestOutput:
        """Async generate of one prompt; cancelling the task aborts the request."""
        req, q = self._async_request(prompt, params, True)
        async for _ in self._drain(req, q):
            pass
        return req.to_output()

    async def astream_chat(self, messages: list[dict], params: SamplingParams | dict | None = None
                           ) -> AsyncIterator[StreamChunk]:
        """Async `stream_chat`."""
        req, q = self._async_request(self.render_chat(messages), params, False)
        async for chunk in self._drain(req, q):
            yield chunk

    async def achat(self, messages: list[dict], params: SamplingParams | dict | None = None) -> RequestOutput:
        """Async `chat`."""
        req, q = self._async_request(self.render_chat(messages), params, False)
        async for _ in self._drain(req, q):
            pass
        return req.to_output()

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text the model's chat template makes of `messages`."""
        return self.inputs.render_chat(messages)

    def chat(self, messages: list[dict], params: SamplingParams | dict | None = None) -> RequestOutput:
        """Reply to a conversation, rendered with the model's chat template."""
        return self._generate([self.render_chat(messages)], params, add_special_tokens=False)[0]

"""An asyncio chatbot backend: one Engine serves many conversations at once.

Concurrent `agenerate` / `astream` / `achat` calls on one engine are batched together by the
engine thread; the event loop is never blocked. Cancelling a task (a user who hangs up)
aborts its request and frees its KV cache at once.

    python examples/chatbot_backend.py
"""
import asyncio
import time

from fastllm import Engine, SamplingParams

PARAMS = SamplingParams(max_tokens=48, temperature=0.7, seed=0)


async def answer(engine: Engine, user: str, question: str) -> None:
    reply = await engine.achat([{"role": "user", "content": question}], PARAMS)
    print(f"[{user}] {reply.text!r} ({reply.metrics.num_generated_tokens} tokens)")


async def complete(engine: Engine, user: str, prompt: str) -> None:
    out = await engine.agenerate(prompt, PARAMS)
    print(f"[{user}] {prompt!r} -> {out.text!r}")


async def stream_to_client(engine: Engine, user: str, prompt: str) -> None:
    # A real server would write each delta to a websocket or an SSE response.
    parts = []
    try:
        async for chunk in engine.astream(prompt, SamplingParams(max_tokens=200, temperature=0.7, seed=0)):
            parts.append(chunk.text)
    except asyncio.CancelledError:
        print(f"[{user}] cancelled after {len(parts)} chunks: {''.join(parts)!r}")
        raise
    print(f"[{user}] streamed {len(parts)} chunks")


async def main() -> None:
    with Engine() as engine:
        start = time.perf_counter()
        tasks = [
            asyncio.create_task(answer(engine, "alice", "What is the capital of France?")),
            asyncio.create_task(answer(engine, "bob", "Give me one tip for sleeping well.")),
            asyncio.create_task(complete(engine, "carol", "The three primary colours are")),
            asyncio.create_task(stream_to_client(engine, "dave", "Once upon a time, a little robot")),
        ]
        await asyncio.sleep(2.0)
        tasks[-1].cancel()  # dave closed the tab: his request is aborted, the others go on
        results = await asyncio.gather(*tasks, return_exceptions=True)
        cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
        print(f"{len(tasks) - cancelled} served, {cancelled} cancelled, in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    asyncio.run(main())

"""Engine behaviour on the real embedded model: API shapes, streaming, seeds, threads, asyncio,
cancellation and bad input."""
from __future__ import annotations

import asyncio
import threading

import pytest

from fastllm import SamplingParams
from fastllm.errors import ConfigError, EngineClosedError, InvalidRequestError, PromptTooLongError

GREEDY = SamplingParams(temperature=0, max_tokens=8)


def test_generate_keeps_order_and_accepts_a_single_string(smollm2_engine):
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Hello"]
    outs = smollm2_engine.generate(prompts, GREEDY)
    assert [o.prompt for o in outs] == prompts
    single = smollm2_engine.generate(prompts[1], GREEDY)
    assert len(single) == 1 and single[0].token_ids == outs[1].token_ids
    o = outs[0]
    assert o.finish_reason in ("stop", "length") and len(o.token_ids) <= 8
    assert o.metrics.time_to_first_token > 0 and o.metrics.num_prompt_tokens == len(o.prompt_token_ids)


def test_stream_equals_generate(smollm2_engine):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    whole = smollm2_engine.generate("Explain what a compiler does.", params)[0]
    chunks = list(smollm2_engine.stream("Explain what a compiler does.", params))
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert all(c.finish_reason is None for c in chunks[:-1]) and chunks[-1].finish_reason == "length"


def test_text_matches_tokenizer_decode(smollm2_engine):
    out = smollm2_engine.generate("Write a list of fruits:", SamplingParams(temperature=0, max_tokens=30))[0]
    assert out.text == smollm2_engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_and_batch_independent(smollm2_engine):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    a = smollm2_engine.generate("Once upon a time", p)[0].token_ids
    # same seed inside a batch of other (unseeded) requests gives the same tokens
    batch = smollm2_engine.generate(["Once upon a time", "Once upon a time", "Tell me"],
                                    [p, SamplingParams(temperature=1.0, max_tokens=16), p])
    assert batch[0].token_ids == a
    other = smollm2_engine.generate("Once upon a time", p.model_copy(update={"seed": 99}))[0].token_ids
    assert other != a


def test_stop_strings_and_stop_token_ids(smollm2_engine):
    base = smollm2_engine.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20))[0]
    assert " 6" in base.text
    cut = smollm2_engine.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20, stop=[" 6"]))[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[:base.text.index(" 6")]
    streamed = "".join(c.text for c in smollm2_engine.stream("1, 2, 3, 4,", SamplingParams(
        temperature=0, max_tokens=20, stop=" 6")))
    assert streamed == cut.text
    tok = base.token_ids[2]
    by_id = smollm2_engine.generate("1, 2, 3, 4,", SamplingParams(temperature=0, max_tokens=20,
                                                                  stop_token_ids=[tok]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == base.token_ids[:3]


def test_sixteen_threads_share_one_engine(smollm2_engine):
    prompts = [f"Count from {i}:" for i in range(16)]
    expected = [o.token_ids for o in smollm2_engine.generate(prompts, GREEDY)]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            got[i] = smollm2_engine.generate(prompts[i], GREEDY)[0].token_ids
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert [got[i] for i in range(16)] == expected


def test_async_generate_and_cancelled_stream(smollm2_engine):
    async def main():
        long = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

        async def consume():
            n = 0
            async for _ in smollm2_engine.astream("Tell me a long story.", long):
                n += 1
            return n

        task = asyncio.create_task(consume())
        others = [smollm2_engine.agenerate(f"Question {i}:", GREEDY) for i in range(3)]
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        outs = await asyncio.gather(*others)
        assert all(o.finish_reason in ("stop", "length") for o in outs)
        # a stream closed early by the consumer also frees its request
        agen = smollm2_engine.astream("Another story:", long)
        await agen.__anext__()
        await agen.aclose()

    asyncio.run(main())
    _wait_idle(smollm2_engine)
    assert smollm2_engine.attention.caches == {}


def test_sync_stream_closed_early_is_aborted(smollm2_engine):
    it = smollm2_engine.stream("Tell me a story.", SamplingParams(max_tokens=300, ignore_eos=True))
    next(it)
    it.close()
    _wait_idle(smollm2_engine)
    assert smollm2_engine.attention.caches == {}


def _wait_idle(engine, timeout: float = 30.0) -> None:
    import time

    end = time.time() + timeout
    while time.time() < end:
        if not engine.batcher.has_work() and not engine._inbox and not engine._aborts:
            return
        time.sleep(0.02)
    raise AssertionError("engine did not become idle")


@pytest.mark.parametrize("prompt, error", [
    ("", InvalidRequestError),
    (123, InvalidRequestError),
    (None, InvalidRequestError),
    ([["nested"]], InvalidRequestError),
    ([b"bytes"], InvalidRequestError),
    ({"prompt_token_ids": []}, InvalidRequestError),
    ({"prompt_token_ids": [1, -5]}, InvalidRequestError),
    ({"prompt_token_ids": [10 ** 9]}, InvalidRequestError),
    ({"text": "hi"}, InvalidRequestError),
    ("word " * 9000, PromptTooLongError),
])
def test_bad_prompt_fails_alone(smollm2_engine, prompt, error):
    results = {}

    def good():
        results["good"] = smollm2_engine.generate("The capital of France is", GREEDY)[0]

    t = threading.Thread(target=good)
    t.start()
    with pytest.raises(error):
        smollm2_engine.generate(prompt, GREEDY)
    t.join(timeout=60)
    assert "Paris" in results["good"].text


@pytest.mark.parametrize("params", [
    {"temperature": -1},
    {"top_p": 0},
    {"max_tokens": 0},
    {"bogus": 1},
    {"stop": [""]},
    "not params",
])
def test_bad_params_fail_alone(smollm2_engine, params):
    with pytest.raises(InvalidRequestError):
        smollm2_engine.generate("Hello", params)
    assert smollm2_engine.generate("Hello", GREEDY)[0].finish_reason in ("stop", "length")


def test_bad_prompt_in_a_list_names_its_index(smollm2_engine):
    with pytest.raises(InvalidRequestError, match="prompt 1"):
        smollm2_engine.generate(["ok", 5, "ok"], GREEDY)


def test_unknown_engine_option_names_valid_keys():
    from fastllm import Engine

    with pytest.raises(ConfigError, match="max_num_seqs"):
        Engine(max_num_seq=3)
    with pytest.raises(ConfigError, match="sdpa"):
        Engine(attention="flashy")


def test_closed_engine_refuses_requests(smollm2_dir):
    from fastllm import Engine

    engine = Engine(str(smollm2_dir), dtype="float32", progress=False)
    it = engine.stream("Tell me a story.", SamplingParams(max_tokens=500, ignore_eos=True))
    next(it)
    engine.close()
    assert list(it)[-1].finish_reason == "abort"
    with pytest.raises(EngineClosedError):
        engine.generate("Hello", GREEDY)
    engine.close()  # idempotent


def test_an_engine_dropped_without_close_is_collected(tiny_model):
    import gc
    import weakref

    from fastllm import Engine

    engine = Engine(str(tiny_model("llama")), device="cpu", dtype="float32", progress=False)
    assert engine.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2))[0].token_ids
    ref, thread = weakref.ref(engine), engine._thread
    del engine
    gc.collect()
    assert ref() is None  # nothing (the engine thread included) keeps it, nor its memory
    thread.join(timeout=5)
    assert not thread.is_alive()

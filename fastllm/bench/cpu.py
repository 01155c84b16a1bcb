"""`fastllm bench cpu`: batch-1 greedy decode of the embedded default model on the CPU,
beside HF transformers' `generate` on the very same weights, in the same process.

Every variant is loaded first, then the repeats are interleaved (ours, theirs, ours, ...) so
that drift in a shared machine's memory bandwidth hits all variants alike. Decode speed is
(N - 1) / (t(N tokens) - t(1 token)) from the medians, so prompt processing stays out of it.
"""
from __future__ import annotations

import platform
import statistics
import time
from datetime import date
from typing import Callable


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prompt_ids(tokenizer, length: int) -> list[int]:
    """A prompt of `length` tokens cut from Python's own documentation (always installed)."""
    import pydoc_data.topics as topics

    text = " ".join(list(topics.topics.values())[:20])
    return tokenizer.encode(text, add_special_tokens=False)[:length]


def _variants(ids: list[int], dtypes, compare: bool) -> dict[tuple[str, str], Callable[[int], None]]:
    import torch

    from .. import Engine, SamplingParams
    from ..stages.loaders.gguf import cached_model_dir

    runs: dict[tuple[str, str], Callable[[int], None]] = {}
    for dtype in dtypes:
        eng = Engine(dtype=dtype, device="cpu", progress=False)
        runs["fastllm", dtype] = lambda n, eng=eng: eng.generate(
            {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        if compare:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(str(cached_model_dir()), dtype=getattr(torch, dtype)).eval()
            x = torch.tensor([ids])

            def theirs(n: int, hf=hf) -> None:
                with torch.inference_mode():
                    hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                min_new_tokens=n, pad_token_id=0)

            runs["transformers", dtype] = theirs
    return runs


def run(new_tokens: int = 128, prompt_len: int = 64, repeats: int = 5,
        dtypes: tuple[str, ...] = ("float32", "bfloat16"), compare: bool = True) -> dict:
    import torch
    from transformers import AutoTokenizer

    from ..stages.loaders.gguf import cached_model_dir

    from .. import Engine

    Engine(progress=False).close()  # converts the GGUF file once if this machine has not yet
    ids = prompt_ids(AutoTokenizer.from_pretrained(str(cached_model_dir())), prompt_len)
    runs = _variants(ids, dtypes, compare)
    times: dict[tuple[str, str], dict[int, list[float]]] = {k: {1: [], new_tokens: []} for k in runs}
    for fn in runs.values():
        fn(4)  # warm-up
    for _ in range(repeats):
        for key, fn in runs.items():
            for n in (1, new_tokens):
                t = time.perf_counter()
                fn(n)
                times[key][n].append(time.perf_counter() - t)
    rows = [{"engine": e, "dtype": d,
             "tok_s": (new_tokens - 1) / (statistics.median(t[new_tokens]) - statistics.median(t[1]))}
            for (e, d), t in times.items()]
    return {"workload": "cpu", "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized)",
            "batch": 1, "prompt_tokens": len(ids), "new_tokens": new_tokens, "repeats": repeats,
            "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "torch": torch.__version__, "date": date.today().isoformat(), "rows": rows}


def table(result: dict) -> str:
    base = {r["dtype"]: r["tok_s"] for r in result["rows"] if r["engine"] == "transformers"}
    lines = [f"{'engine':<14}{'dtype':<10}{'tok/s':>8}{'vs HF':>8}"]
    for r in result["rows"]:
        ratio = r["tok_s"] / base[r["dtype"]] if r["dtype"] in base else float("nan")
        lines.append(f"{r['engine']:<14}{r['dtype']:<10}{r['tok_s']:>8.1f}{ratio:>8.2f}")
    return "\n".join(lines)

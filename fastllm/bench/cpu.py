"""`fastllm bench cpu`: batch-1 greedy decode of the embedded default model on the CPU,
beside HF transformers' `generate` on the very same weights, in the same process.

Decode speed of both is measured the same way: (t(N tokens) - t(1 token)) / (N - 1), the
median over repeats, so prompt processing and start-up stay out of the number.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from datetime import date
from typing import Callable


def decode_rate(run: Callable[[int], None], n: int, repeats: int) -> float:
    run(4)  # warm-up
    one, many = [], []
    for _ in range(repeats):
        t = time.perf_counter(); run(1); one.append(time.perf_counter() - t)
        t = time.perf_counter(); run(n); many.append(time.perf_counter() - t)
    return (n - 1) / (statistics.median(many) - statistics.median(one))


def prompt_ids(tokenizer, length: int) -> list[int]:
    """A prompt of `length` tokens cut from Python's own documentation (always installed)."""
    import pydoc_data.topics as topics

    text = " ".join(list(topics.topics.values())[:20])
    return tokenizer.encode(text, add_special_tokens=False)[:length]


def run(new_tokens: int = 128, prompt_len: int = 64, repeats: int = 3,
        dtypes: tuple[str, ...] = ("float32", "bfloat16"), compare: bool = True) -> dict:
    import torch

    from .. import Engine, SamplingParams

    rows = []
    for dtype in dtypes:
        with Engine(dtype=dtype, device="cpu", progress=False) as eng:
            ids = prompt_ids(eng.tokenizer, prompt_len)

            def ours(n: int) -> None:
                eng.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))

            rows.append({"engine": "fastllm", "dtype": dtype, "tok_s": decode_rate(ours, new_tokens, repeats)})
        if compare:
            from transformers import AutoModelForCausalLM

            from ..config import EngineConfig
            from ..engine import _cache_dir
            from ..stages.loaders.gguf import default_model_file, file_sha256

            model_dir = _cache_dir(EngineConfig()) / "gguf" / file_sha256(default_model_file())[:32]
            hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
            x = torch.tensor([ids])

            def theirs(n: int) -> None:
                with torch.inference_mode():
                    hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                min_new_tokens=n, pad_token_id=0)

            rows.append({"engine": "transformers", "dtype": dtype, "tok_s": decode_rate(theirs, new_tokens, repeats)})
            del hf
    return {"workload": "cpu", "model": "SmolLM2-135M-Instruct (embedded GGUF, dequantized)",
            "batch": 1, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "date": date.today().isoformat(), "rows": rows}


def table(result: dict) -> str:
    base = {r["dtype"]: r["tok_s"] for r in result["rows"] if r["engine"] == "transformers"}
    lines = [f"{'engine':<14}{'dtype':<10}{'tok/s':>8}{'vs HF':>8}"]
    for r in result["rows"]:
        ratio = r["tok_s"] / base[r["dtype"]] if r["dtype"] in base else float("nan")
        lines.append(f"{r['engine']:<14}{r['dtype']:<10}{r['tok_s']:>8.1f}{ratio:>8.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    res = run()
    print(json.dumps(res, indent=1))
    print(table(res))

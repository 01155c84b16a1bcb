"""`fastllm bench latency` and `fastllm bench throughput` (BENCHMARKS.md's GPU workloads).

latency: one request, greedy, EOS ignored; decode tok/s against the floor = weight bytes /
measured copy bandwidth. throughput: many requests submitted at once; output and total tok/s.
`--compare transformers` runs HF transformers on the same shape in the same process.
"""
from __future__ import annotations

import random
import statistics
import time
from datetime import date

import torch

from .common import copy_bandwidth, hf_model, sync, weight_bytes


def _engine(model: str, options: dict):
    from .. import Engine

    return Engine(model, progress=False, **options)


def _prompts(n: int, lengths: list[int], vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(10, vocab - 10, (n_,), generator=g).tolist()} for n_ in lengths]


def _perplexity(eng, tokens: int | None) -> dict | None:
    """The engine's perplexity on the default evaluation text (its first `tokens` tokens), so the
    quality cost of a configuration is printed beside its speed; None when not asked for."""
    if not tokens:
        return None
    from ..eval import perplexity

    return perplexity(eng, context=min(512, eng.max_model_len), max_tokens=tokens).to_dict()


def latency(model: str, batch: int = 1, input_len: int = 128, output_len: int = 256, repeats: int = 3,
            compare: bool = False, options: dict | None = None, perplexity_tokens: int | None = None) -> dict:
    from .. import SamplingParams

    t0 = time.perf_counter()
    eng = _engine(model, options or {})
    start_s = time.perf_counter() - t0
    dev = eng.device
    wbytes = weight_bytes(eng.runner.model)
    bw = copy_bandwidth(dev) if dev.type == "cuda" else float("nan")
    prompts = _prompts(batch, [input_len] * batch, eng.vocab_size, 0)
    sp = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    eng.generate(prompts, sp)  # warm-up
    full, first = [], []
    for _ in range(repeats):
        sync(dev); t = time.perf_counter(); eng.generate(prompts, one); sync(dev); first.append(time.perf_counter() - t)
        sync(dev); t = time.perf_counter(); eng.generate(prompts, sp); sync(dev); full.append(time.perf_counter() - t)
    step_s = (statistics.median(full) - statistics.median(first)) / (output_len - 1)
    floor = bw / wbytes if bw == bw else float("nan")
    rows = [{"engine": "fastllm", "ms_per_token": step_s * 1e3, "tok_s": batch / step_s,
             "seq_tok_s": 1 / step_s, "fraction_of_floor": (1 / step_s) / floor, "startup_s": start_s}]
    ppl = _perplexity(eng, perplexity_tokens)
    eng.close()
    if compare:
        rows.append(_hf_latency(model, prompts, output_len, repeats, dev))
    return {"workload": "latency", "model": model, "batch": batch, "input_len": input_len,
            "output_len": output_len, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "weight_bytes": wbytes, "copy_bandwidth_Bps": bw, "floor_tok_s": floor,
            "torch": torch.__version__, "date": date.today().isoformat(), "options": options or {}, "rows": rows,
            "perplexity": ppl}


def _hf_latency(model: str, prompts, output_len: int, repeats: int, dev) -> dict:
    hf = hf_model(model.removeprefix("dummy:"), torch.bfloat16, dev)
    x = torch.tensor([p["prompt_token_ids"] for p in prompts], device=dev)

    def gen(n: int) -> float:
        sync(dev); t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                        min_new_tokens=n, pad_token_id=0)
        sync(dev)
        return time.perf_counter() - t

    n = min(output_len, 64)  # HF is slow; its per-token time does not depend on n
    gen(4)
    step = (statistics.median([gen(n) for _ in range(repeats)]) - statistics.median([gen(1) for _ in range(repeats)])) / (n - 1)
    return {"engine": "transformers generate", "ms_per_token": step * 1e3, "tok_s": len(prompts) / step,
            "seq_tok_s": 1 / step, "output_len_measured": n}


def sharegpt_like_lengths(n: int, seed: int = 0, max_len: int = 1024) -> list[tuple[int, int]]:
    """(prompt, output) lengths drawn from log-normal fits of the ShareGPT shape (long-tailed, means
    near 220 in / 200 out), clipped to [4, max_len]. Synthetic: nothing is downloaded."""
    r = random.Random(seed)
    clip = lambda v: max(4, min(max_len, int(v)))  # noqa: E731
    return [(clip(r.lognormvariate(4.9, 1.0)), clip(r.lognormvariate(4.8, 0.9))) for _ in range(n)]


def throughput(model: str, num_requests: int = 1000, input_len: int = 128, output_len: int = 128,
               mix: str = "fixed", compare: bool = False, compare_requests: int = 256,
               options: dict | None = None, repeats: int = 3, perplexity_tokens: int | None = None) -> dict:
    from .. import SamplingParams

    eng = _engine(model, options or {})
    dev = eng.device
    lengths = ([(input_len, output_len)] * num_requests if mix == "fixed"
               else sharegpt_like_lengths(num_requests, max_len=min(1024, eng.max_model_len // 2)))
    prompts = _prompts(num_requests, [a for a, _ in lengths], eng.vocab_size, 1)
    params = [SamplingParams(temperature=0, max_tokens=b, ignore_eos=True) for _, b in lengths]
    # Warm-up: the whole workload once, untimed. Every step shape then has been seen (the allocator
    # has grown; Triton has tuned each GEMM's token-count bucket, which a 256-request warm-up left
    # to the first timed run: int8's ran at a third of its later speed). It is reported apart.
    sync(dev); t = time.perf_counter()
    eng.generate(prompts, params)
    sync(dev); warm = time.perf_counter() - t
    walls = []
    for i in range(repeats):
        if hasattr(eng.attention, "reset_prefix_cache"):  # each run starts cold: no hits from the last
            eng.attention.reset_prefix_cache()
        sync(dev); t = time.perf_counter()
        outs = eng.generate(prompts, params)
        sync(dev); walls.append(time.perf_counter() - t)
    wall = statistics.median(walls)
    out_tokens = sum(len(o.token_ids) for o in outs)
    in_tokens = sum(a for a, _ in lengths)
    rows = [{"engine": "fastllm", "requests": num_requests, "wall_s": wall, "output_tok_s": out_tokens / wall,
             "total_tok_s": (out_tokens + in_tokens) / wall, "runs_output_tok_s": [out_tokens / w for w in walls],
             "warmup_output_tok_s": out_tokens / warm}]
    ppl = _perplexity(eng, perplexity_tokens)
    eng.close()
    if compare:
        rows.append(_hf_throughput(model, prompts[:compare_requests], lengths[:compare_requests], dev))
    return {"workload": "throughput", "model": model, "mix": mix, "input_len": input_len, "output_len": output_len,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "date": date.today().isoformat(), "options": options or {}, "rows": rows,
            "perplexity": ppl}


def _hf_throughput(model: str, prompts, lengths, dev) -> dict:
    from transformers import GenerationConfig

    hf = hf_model(model.removeprefix("dummy:"), torch.bfloat16, dev)
    out_len = max(b for _, b in lengths)
    cfg = GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    kw = {}
    try:  # flash-attn is not installed here: keep HF's paged sdpa path instead of switching to it
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        kw["continuous_batching_config"] = ContinuousBatchingConfig(auto_switch_to_flash=False)
    except (ImportError, TypeError):
        pass
    inputs = [p["prompt_token_ids"] for p in prompts]
    # no inference_mode here: HF's batching thread updates tensors outside it
    hf.generate_batch(inputs=inputs[:8], generation_config=cfg, **kw)  # warm-up
    sync(dev); t = time.perf_counter()
    res = hf.generate_batch(inputs=inputs, generation_config=cfg, **kw)
    sync(dev); wall = time.perf_counter() - t
    out_tokens = sum(len(r.generated_tokens) for r in res.values())
    errors = sorted({str(r.error) for r in res.values() if getattr(r, "error", None)})
    del hf
    torch.cuda.empty_cache()
    row = {"engine": "transformers generate_batch", "requests": len(inputs), "wall_s": wall,
           "output_tok_s": out_tokens / wall,
           "total_tok_s": (out_tokens + sum(len(i) for i in inputs)) / wall}
    if errors or out_tokens == 0:
        row["error"] = "; ".join(errors)[:500] or "no tokens generated"
        print(f"transformers generate_batch failed: {row['error']}")
    return row

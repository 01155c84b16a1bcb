"""Batch-1 decode of a dummy checkpoint shape on CUDA with the current (eager, sdpa) engine:
a baseline for the GPU fast path. Usage: python scripts/gpu_probe.py [shape] [new_tokens]"""
import sys
import time

import torch

from fastllm import Engine, SamplingParams

shape = sys.argv[1] if len(sys.argv) > 1 else "llama-2-7b"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
t = time.perf_counter()
with Engine(f"dummy:{shape}", progress=False) as eng:
    load = time.perf_counter() - t
    prompt = {"prompt_token_ids": torch.randint(0, eng.vocab_size, (128,)).tolist()}
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    eng.generate(prompt, sp)
    rates = [eng.generate(prompt, sp)[0].metrics.decode_tokens_per_s for _ in range(3)]
    weights = sum(p.numel() * p.element_size() for p in eng.runner.model.parameters())
print(f"{torch.cuda.get_device_name()} {shape} bf16 batch1: load {load:.1f}s, decode {sorted(rates)[1]:.1f} tok/s, "
      f"weights {weights / 1e9:.2f} GB")

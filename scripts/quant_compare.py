"""Perplexity of every quantizer on the real SmolLM2 weights (CPU), beside torchao's weight-only
int8 / int4 on the same weights, text and windows, in one run; and fastllm's batch-1 decode
speed for each (bf16 activations). Writes JSON and prints a markdown table.

Usage: python scripts/quant_compare.py OUT.json [max_tokens]
"""
import copy
import json
import statistics
import sys
import time
from datetime import date

import torch

from fastllm import Engine, SamplingParams
from fastllm.eval import default_text, perplexity
from fastllm.stages.loaders import gguf

if {"-h", "--help"} & set(sys.argv[1:]):  # not an output path
    sys.exit(print(__doc__))

out_path = sys.argv[1] if len(sys.argv) > 1 else "quant_compare.json"
max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
CONTEXT = 512
text, source = default_text()
rows = []


def add(name, engine_name, res, tok_s=None):
    rows.append(dict(name=name, engine=engine_name, perplexity=res.perplexity, tokens=res.num_tokens, tok_s=tok_s))
    print(f"{name:40s} {res.perplexity:8.4f}  {'' if tok_s is None else f'{tok_s:.1f} tok/s'}", flush=True)


def decode_speed(quantizer) -> float:
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    with Engine(dtype="bfloat16", device="cpu", progress=False, quantizer=quantizer) as e:
        e.generate("The capital of France is", sp)
        return statistics.median(e.generate("The capital of France is", sp)[0].metrics.decode_tokens_per_s
                                 for _ in range(3))


variants = [("fp32", "float32", "none"), ("bf16", "bfloat16", "none"), ("int8", "float32", "int8"),
            ("int8, dynamic int8 activations (W8A8)", "float32", {"name": "int8", "activations": "dynamic"}),
            ("fp8", "float32", "fp8")]
try:  # plugins/fastllm-bitsandbytes, where bitsandbytes is installed
    import bitsandbytes  # noqa: F401
    variants += [("bnb-int8 (LLM.int8)", "float32", "bnb-int8"), ("bnb-nf4", "float32", "bnb-nf4")]
except ImportError:
    pass
for g in (32, 64, 128):
    variants.append((f"int4 g{g}", "float32", {"name": "int4", "group_size": g}))
    variants.append((f"int4 g{g} activation-aware", "float32", {"name": "int4", "group_size": g, "activation_aware": True}))
for name, dtype, q in variants:
    with Engine(dtype=dtype, device="cpu", progress=False, quantizer=q) as e:
        res = perplexity(e, text, context=CONTEXT, max_tokens=max_tokens, source=source)
    # AWQ decodes as fast as plain int4; fp8 is dequantized per call on the CPU (no speed path there)
    timed = name == "bf16" or (q not in ("none", "fp8", "bnb-int8", "bnb-nf4") and "activation" not in name)
    add(name, "fastllm", res, decode_speed(q) if timed else None)

# torchao on the same weights: HF transformers' model of the converted checkpoint, fp32
try:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gguf.cached_model_dir(gguf.default_model_file()),
                                              dtype=torch.float32).eval()
    with Engine(dtype="float32", device="cpu", progress=False) as e:
        tokenizer, max_len = e.tokenizer, e.max_model_len

    class HFScorer:  # what fastllm.eval.perplexity needs of an engine
        def __init__(self, model):
            self.model, self.tokenizer, self.max_model_len = model, tokenizer, max_len

        @torch.no_grad()
        def prompt_logits(self, ids):
            return self.model(torch.tensor([ids])).logits[0].float()

    not_head = lambda mod, fqn: isinstance(mod, torch.nn.Linear) and "lm_head" not in fqn  # noqa: E731
    add("HF fp32 (reference)", "transformers", perplexity(HFScorer(hf), text, context=CONTEXT, max_tokens=max_tokens))
    configs = [("torchao int8 weight-only", Int8WeightOnlyConfig())]
    configs += [(f"torchao int4 g{g} (IntxWeightOnly)", IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                              granularity=PerGroup(g)))
                for g in (32, 64, 128)]
    for name, cfg in configs:
        m = copy.deepcopy(hf)
        try:
            quantize_(m, cfg, filter_fn=not_head)
            add(name, "torchao", perplexity(HFScorer(m), text, context=CONTEXT, max_tokens=max_tokens))
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            rows.append(dict(name=name, engine="torchao", error=f"{type(exc).__name__}: {exc}"[:200]))
            print(f"{name:40s} n/a: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
except ImportError as exc:
    print(f"torchao not installed ({exc}); pip install torchao to compare")

result = dict(text=source, context=CONTEXT, max_tokens=max_tokens, torch=torch.__version__, date=date.today().isoformat(),
              machine="CPU", rows=rows, created=time.time())
with open(out_path, "w") as f:
    json.dump(result, f, indent=1)
print("\n| variant | engine | perplexity | decode tok/s (bf16 activations) |\n|---|---|---|---|")
for r in rows:
    ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else f"n/a ({r['error'][:60]})"
    print(f"| {r['name']} | {r['engine']} | {ppl} | {r.get('tok_s') and round(r['tok_s'], 1) or ''} |")

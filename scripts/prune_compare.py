"""Perplexity of every pruner on the real SmolLM2 weights (CPU), in one run: magnitude (per
layer, the Wanda paper's baseline) and Wanda at 25/50/70% unstructured sparsity, 2:4 by either
score, and magnitude + Wanda 50% followed by int8. Writes JSON and prints a markdown table.

Usage: python scripts/prune_compare.py OUT.json [max_tokens]
"""
import json
import sys
import time
from datetime import date

import torch

from fastllm import Engine
from fastllm.eval import default_text, perplexity

if {"-h", "--help"} & set(sys.argv[1:]):  # not an output path
    sys.exit(print(__doc__))

out_path = sys.argv[1] if len(sys.argv) > 1 else "prune_compare.json"
max_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
CONTEXT = 512
text, source = default_text()
variants = [("dense", "none", "none")]
for s in (0.25, 0.5, 0.7):
    variants += [(f"magnitude {s:.0%}", {"name": "magnitude", "sparsity": s}, "none"),
                 (f"wanda {s:.0%}", {"name": "wanda", "sparsity": s}, "none")]
variants += [("2:4 magnitude", {"name": "2:4"}, "none"), ("2:4 wanda", {"name": "2:4", "score": "wanda"}, "none"),
             ("wanda 50% + int8", {"name": "wanda", "sparsity": 0.5}, "int8")]
rows = []
for name, pruner, quantizer in variants:
    t = time.perf_counter()
    with Engine(dtype="float32", device="cpu", progress=False, pruner=pruner, quantizer=quantizer) as e:
        start_s = time.perf_counter() - t
        sparsity = e.runner.model.__dict__.get("fastllm_sparsity", 0.0)
        res = perplexity(e, text, context=CONTEXT, max_tokens=max_tokens, source=source)
    rows.append(dict(name=name, pruner=pruner, quantizer=quantizer, sparsity=sparsity, perplexity=res.perplexity,
                     tokens=res.num_tokens, startup_s=start_s))
    print(f"{name:22s} sparsity {sparsity:6.1%}  perplexity {res.perplexity:10.3f}  start-up {start_s:5.1f} s", flush=True)
    json.dump({"date": date.today().isoformat(), "torch": torch.__version__, "source": source, "context": CONTEXT,
               "max_tokens": max_tokens, "rows": rows}, open(out_path, "w"), indent=1)
dense = rows[0]["perplexity"]
print("\n| variant | zero weights (pruned layers) | perplexity | vs dense |\n|---|---|---|---|")
for r in rows:
    print(f"| {r['name']} | {r['sparsity']:.1%} | {r['perplexity']:.3f} | {r['perplexity'] / dense - 1:+.1%} |")

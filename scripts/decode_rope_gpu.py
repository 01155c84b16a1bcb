"""Decode attention on CUDA: rope_store_kv + paged_decode (two launches and a merge) against
paged_decode_rope (one launch, merge in the kernel or after it), Llama shapes, graph-timed.

Each variant is timed alone and after the qkv projection it follows in a model (a bf16 GEMV,
4096 inputs), since paged_decode_rope loads its first K/V tile while that GEMV finishes; the
chain rotates over 8 layers' weights and caches so L2 does not help.

Usage: python scripts/decode_rope_gpu.py OUTDIR [--batches=1,64,256] [--contexts=256,2048]
Prints a table last; JSON in OUTDIR.
"""
import json
import math
import sys

import torch
from torch import nn

from fastllm.bench.common import graph_time, script_out_dir
from fastllm.core.cuda_linear import DecodeLinear
from fastllm.kernels import paged_attention as pa

out_dir = script_out_dir(__doc__)
DEV, DTYPE, BLOCK, LAYERS = torch.device("cuda"), torch.bfloat16, 16, 8
MODELS = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}
BATCHES = [int(x) for a in sys.argv if a.startswith("--batches=") for x in a.split("=")[1].split(",")] or [1, 64, 256]
CONTEXTS = [int(x) for a in sys.argv if a.startswith("--contexts=") for x in a.split("=")[1].split(",")] or [256, 2048]
rows, lines = [], []
for model, (h, kvh, d) in MODELS.items():
    for ctx in CONTEXTS:
        for B in BATCHES:
            need = math.ceil(ctx / BLOCK)
            per_layer = 2 * (B * need + 1) * BLOCK * kvh * d * 2
            n_caches = max(1, min(LAYERS, int(12e9 // per_layer)))  # large caches outgrow L2 anyway
            caches = [torch.randn(2, B * need + 1, BLOCK, kvh, d, device=DEV, dtype=DTYPE) for _ in range(n_caches)]
            tables = (torch.randperm(B * need, device=DEV) + 1).view(B, need).to(torch.int32)
            seq_lens = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
            slots = (tables[:, (ctx - 1) // BLOCK].long() * BLOCK + (ctx - 1) % BLOCK)
            positions = seq_lens.long() - 1
            inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEV).float() / d))
            splits = pa.decode_num_splits(B, kvh, DEV)
            scratch = pa.decode_scratch(B, h, d, splits, DEV)
            tickets = pa.decode_tickets(B, kvh, DEV)
            projs = []
            for _ in range(LAYERS):
                lin = nn.Linear(4096, (h + 2 * kvh) * d, bias=False, device=DEV, dtype=DTYPE)
                lin.__class__ = DecodeLinear
                projs.append(lin)
            x = torch.randn(B, 4096, device=DEV, dtype=DTYPE)
            qkv = torch.randn(B, h + 2 * kvh, d, device=DEV, dtype=DTYPE)
            out = torch.empty(B, h, d, device=DEV, dtype=DTYPE)

            def attend(variant, layer, qkv):
                kc, vc = caches[layer % n_caches][0], caches[layer % n_caches][1]  # noqa: B023
                qk, v = qkv[:, :h + kvh], qkv[:, h + kvh:]
                if variant == "unfused":
                    pa.rope_store_kv(qk, v, kc, vc, slots, positions, inv_freq, 1.0, h)
                    pa.paged_decode(qk[:, :h], kc, vc, tables, seq_lens, d ** -0.5, out, splits, scratch)
                else:
                    pa.paged_decode_rope(qk, v, kc, vc, tables, seq_lens, slots, positions, inv_freq, 1.0,
                                         d ** -0.5, out, splits, scratch, tickets if variant == "fused" else None)

            row = {"model": model, "context": ctx, "batch": B, "splits": splits}
            with torch.inference_mode():
                ref = None
                for variant in ("unfused", "fused-sepmerge", "fused"):
                    attend(variant, 0, qkv.clone())  # compile; then the outputs must agree (unfused rotates q in place)
                    got = out.clone()
                    ref = got if ref is None else ref
                    row[variant + "_maxdiff"] = (got.float() - ref.float()).abs().max().item()
                    it = iter(range(10 ** 9))
                    row[variant + "_us"] = graph_time(lambda: attend(variant, next(it) % LAYERS, qkv)) * 1e6  # noqa: B023
                    it = iter(range(10 ** 9))

                    def chain():
                        i = next(it) % LAYERS  # noqa: B023
                        attend(variant, i, projs[i](x).view(B, h + 2 * kvh, d))  # noqa: B023

                    row[variant + "_chain_us"] = graph_time(chain) * 1e6
            rows.append(row)
            (out_dir / "decode_rope_gpu.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                      "rows": rows}, indent=1))
            line = (f"{model} ctx {ctx:5d} B {B:4d} splits {splits:2d}: alone " +
                    " / ".join(f"{row[v + '_us']:.1f}" for v in ("unfused", "fused-sepmerge", "fused")) +
                    " us; after qkv GEMV " + " / ".join(f"{row[v + '_chain_us']:.1f}"
                                                        for v in ("unfused", "fused-sepmerge", "fused")) +
                    f" us; max diff {max(row[v + '_maxdiff'] for v in ('fused-sepmerge', 'fused')):.1e}")
            lines.append(line)
            print(line, flush=True)
            del caches, projs
            torch.cuda.empty_cache()
print(f"\n==== {torch.cuda.get_device_name()}: unfused / fused-sepmerge / fused (us) ====\n" + "\n".join(lines))

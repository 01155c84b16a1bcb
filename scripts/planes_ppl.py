"""What the two-plane activations of int8's tensor-core path (fastllm.kernels.w8a8.w8a16_planes)
cost in perplexity, on the real SmolLM2 weights on the CPU: int8's products of more than one token
computed in float64 from (a) the activations as they are and (b) their two-plane form
(int8.quantize_int8_planes, the kernel's arithmetic), both times the same dequantized weight, in
fp32 and bf16. Only the activations' rounding differs between (a) and (b).

Usage: python scripts/planes_ppl.py OUTDIR [MAX_TOKENS]. JSON in OUTDIR, a table last.
"""
import json
import sys

import torch
import torch.nn.functional as F

from fastllm import Engine
from fastllm.bench.common import script_out_dir
from fastllm.eval import perplexity
from fastllm.stages.quantizers import int8 as Q8

out_dir = script_out_dir(__doc__)
MAX_TOKENS = int(next((a for a in sys.argv[2:] if a.isdigit()), 4096))
real = Q8.Int8Linear.forward


def emulated(planes: bool):
    def forward(self, x):
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] == 1:
            return real(self, x)
        w = self.qweight.double() * self.scale.double()[:, None]
        if planes:
            q, s = Q8.quantize_int8_planes(flat)
            a = s.double()[:, None] * (q[0].double() + q[1].double() / 254.0)
        else:
            a = flat.double()
        out = F.linear(a, w, None if self.bias is None else self.bias.double())
        return out.to(flat.dtype).view(*x.shape[:-1], self.out_features)
    return forward


rows = []
for dtype in ("float32", "bfloat16"):
    for label, fwd in (("int8 (fastllm's own path)", real), ("int8, float64 product", emulated(False)),
                       ("int8, two-plane activations", emulated(True))):
        Q8.Int8Linear.forward = fwd
        with Engine(dtype=dtype, device="cpu", progress=False, quantizer="int8") as e:
            p = perplexity(e, context=512, max_tokens=MAX_TOKENS)
        rows.append({"dtype": dtype, "variant": label, "perplexity": p.perplexity, "tokens": p.num_tokens, "source": p.source})
        print(f"{dtype:9s} {label:30s} {p.perplexity:.4f}", flush=True)
Q8.Int8Linear.forward = real
(out_dir / "planes_ppl.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
print("\n| dtype | variant | perplexity |\n|---|---|---|")
for r in rows:
    print(f"| {r['dtype']} | {r['variant']} | {r['perplexity']:.4f} |")

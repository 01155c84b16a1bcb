"""What the L2 weight prefetch (fastllm.kernels.prefetch) buys a GEMV, in isolation, on one GPU.

Each chain, as a decode step runs it (CUDA graph, PDL): RMSNorm (optionally asking L2 for the
first `bytes` of the GEMV's weight) -> an idle gap of GAP_US (standing in for RoPE and attention)
-> the GEMV over that weight. Eight weight copies rotate so L2 holds no copy from the call before.

Usage: python scripts/prefetch_gpu.py OUTDIR [--gaps=0,5,10]. Prints a table last; JSON in OUTDIR.
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn

from fastllm.bench.common import graph_time
from fastllm.kernels import prefetch as PF
from fastllm.kernels.fused import rms_norm
from fastllm.stages.quantizers.int4 import Int4Linear
from fastllm.stages.quantizers.int8 import Int8Linear

out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
out_dir.mkdir(parents=True, exist_ok=True)
GAPS = [float(g) for a in sys.argv if a.startswith("--gaps=") for g in a.split("=")[1].split(",")] or [0, 5, 10]
dev = torch.device("cuda")
clock_hz = 1.98e9  # H100 SXM's boost clock: torch.cuda._sleep counts cycles
K = 4096
x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
nw = torch.rand(K, device=dev, dtype=torch.bfloat16)
rows, lines = [], []
for kind, N in [("bf16", 2048), ("bf16", 4096), ("int8", 4096), ("int4", 4096), ("int8", 11008)]:
    layers = []
    for _ in range(8):
        lin = nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
        if kind == "bf16":
            from fastllm.core.cuda_linear import DecodeLinear

            lin.__class__ = DecodeLinear
            layers.append(lin)
        else:
            layers.append(Int8Linear(lin) if kind == "int8" else Int4Linear(lin, 128))
    PF.ENABLED = True
    targets = [PF.target(m, 64 << 20, 1) for m in layers]
    nbytes = targets[0][1]
    for gap in GAPS:
        res = {}
        for pf in (False, True):
            i = [0]

            def chain():
                m = layers[i[0] % 8]
                i[0] += 1
                y = rms_norm(x, nw, 1e-5, prefetch=targets[(i[0] - 1) % 8] if pf else None)
                if gap:
                    torch.cuda._sleep(int(gap * 1e-6 * clock_hz))
                return m(y)

            res[pf] = graph_time(chain, iters=16) * 1e6
        row = dict(kind=kind, N=N, K=K, bytes=nbytes, gap_us=gap, plain_us=res[False], prefetch_us=res[True])
        rows.append(row)
        line = (f"{kind:5s} N={N:5d} ({nbytes / 2**20:5.1f} MiB) gap {gap:4.1f} us: {res[False]:7.2f} -> "
                f"{res[True]:7.2f} us with prefetch ({res[False] - res[True]:+.2f})")
        lines.append(line)
        print(line, flush=True)
        (out_dir / "prefetch_gpu.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))
print("\n==== summary ====\n" + "\n".join(lines))

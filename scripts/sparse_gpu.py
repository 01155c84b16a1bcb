"""2:4 semi-structured sparse linear layers against dense on one GPU, Llama-2-7B shapes, in one process.

1. Each layer shape alone at M = 1, 16, 64, 256, 1024 tokens: dense bf16 (cuBLAS) against the
   same 2:4-pruned weight in torch's semi-structured sparse storage (cuSPARSELt, and CUTLASS),
   four weight copies rotated, CUDA-event timed; each checked against the masked dense product.
2. `fastllm bench latency` on the Llama-2-7B shape at batch 1 and 64: dense against
   pruner={"name": "2:4", "storage": "sparse"} (cuSPARSELt, then CUTLASS), same options, CUDA graphs
   on (and off where capture fails).

Usage: python scripts/sparse_gpu.py OUTDIR. Prints a table last; JSON in OUTDIR.
"""
import json
import statistics
import traceback

import torch
import torch.nn.functional as F

from fastllm.bench.common import LLAMA2_7B_LINEARS, script_out_dir
from fastllm.stages.pruners import nm_mask
from fastllm.stages.pruners.semi_structured import to_sparse

out_dir = script_out_dir(__doc__)
dev = torch.device("cuda")
report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "cusparselt": torch.backends.cusparselt.is_available()}
lines: list[str] = []


def dump():
    (out_dir / "sparse_gpu.json").write_text(json.dumps(report, indent=1))


def event_time(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record(); b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / iters)
    return statistics.median(times)


SHAPES = LLAMA2_7B_LINEARS
layers = []
for name, (N, K) in SHAPES.items():
    dense, sparse = [], {"cusparselt": [], "cutlass": []}
    for _ in range(4):
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.mul_(nm_mask(lin.weight.abs().float()).to(lin.weight.dtype))
        dense.append(lin.weight.detach().clone())
        for backend in sparse:
            twin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=torch.bfloat16)
            twin.weight = torch.nn.Parameter(dense[-1].clone(), requires_grad=False)
            to_sparse(twin, backend)
            sparse[backend].append(twin.weight)
    for M in (1, 16, 64, 256, 1024):
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        ref = x.float() @ dense[0].float().T
        it = iter(range(10 ** 9))
        t_d = event_time(lambda d=dense: F.linear(x, d[next(it) % 4]))
        row = dict(shape=name, N=N, K=K, M=M, dense_us=t_d * 1e6)
        cells = []
        for backend, ws in sparse.items():
            try:
                err = ((F.linear(x, ws[0]).float() - ref).norm() / ref.norm()).item()
                t_s = event_time(lambda: F.linear(x, ws[next(it) % 4]))
                row |= {f"{backend}_us": t_s * 1e6, f"{backend}_speedup": t_d / t_s, f"{backend}_err": err}
                cells.append(f"{backend} {t_s * 1e6:7.1f} us ({t_d / t_s:.2f}x, err {err:.0e})")
            except Exception as e:  # noqa: BLE001
                row[f"{backend}_error"] = f"{type(e).__name__}: {e}"[:200]
                cells.append(f"{backend} failed: {type(e).__name__}")
        layers.append(row)
        line = f"{name:8s} M={M:5d}: dense {t_d * 1e6:7.1f} us  " + "  ".join(cells)
        lines.append(line)
        print(line, flush=True)
    report["layers"] = layers
    dump()
    del dense, sparse
    torch.cuda.empty_cache()

from fastllm.bench import gpu as B  # noqa: E402

e2e = []
for batch in (1, 64):
    for pruner in ("none", {"name": "2:4", "storage": "sparse"}, {"name": "2:4", "storage": "sparse", "backend": "cutlass"}):
        for graphs in (True, False):
            opts = {"max_num_seqs": batch, "cuda_graphs": graphs, "pruner": pruner}
            try:
                r = B.latency("dummy:llama-2-7b", batch=batch, output_len=64, repeats=2, options=opts)
                row = dict(batch=batch, pruner=str(pruner), cuda_graphs=graphs, **r["rows"][0])
            except Exception as e:  # noqa: BLE001 - report what failed and go on
                row = dict(batch=batch, pruner=str(pruner), cuda_graphs=graphs, error=f"{type(e).__name__}: {e}"[:300])
                traceback.print_exc(limit=3)
            e2e.append(row)
            report["e2e"] = e2e
            dump()
            line = (f"latency batch {batch:3d} pruner {str(pruner):18s} graphs {graphs!s:5s}: " +
                    (f"{row['tok_s']:8.1f} tok/s ({row['ms_per_token']:.3f} ms/step)" if "tok_s" in row else row["error"]))
            lines.append(line)
            print(line, flush=True)
            torch.cuda.empty_cache()
            if graphs and "tok_s" in row:
                break  # graphs worked: the eager variant is not needed
print("\n==== summary ====\n" + "\n".join(lines))

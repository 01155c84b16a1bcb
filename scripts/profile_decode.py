"""Where a batch-1 decode step of the Llama-2-7B shape spends its time, on one GPU.

1. the linear layers alone at M=1: cuBLAS (F.linear) against fastllm's Triton GEMV, eight
   weight copies rotated so L2 does not help, timed as CUDA-graph replays;
2. the captured decode graph alone (GPU time of one step, LM head included), argmax, and the
   kernels of one eager decode forward by name (torch.profiler);
3. engine latency (overlapped scheduling) with the GEMV and separate norm / SiLU kernels, with
   SiLU-and-mul taken into the GEMV, and with both (the default), with and without PDL.

Usage: python scripts/profile_decode.py OUTDIR [shape] [--quantizers=bf16,int8,...] (only part 2, once per
quantizer; graph replays profiled too). Prints a table last; JSON in OUTDIR.
"""
import json
import sys
from pathlib import Path

import torch

from fastllm.bench.common import graph_time
import torch.nn.functional as F

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
out_dir = Path(ARGS[0] if ARGS else ".")
shape = ARGS[1] if len(ARGS) > 1 else "llama-2-7b"
QUANTIZERS = [q for a in sys.argv if a.startswith("--quantizers=") for q in a.split("=")[1].split(",")]
out_dir.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
report: dict = {"device": torch.cuda.get_device_name(), "shape": shape, "torch": torch.__version__}
lines: list[str] = []


def dump():
    (out_dir / "profile_decode.json").write_text(json.dumps(report, indent=1))


# ---- 1. linears at M=1 -----------------------------------------------------------------
from fastllm.bench.common import LLAMA2_7B_LINEARS, copy_bandwidth  # noqa: E402
from fastllm.kernels import gemv as G  # noqa: E402

bw = copy_bandwidth(dev)
report["copy_bandwidth_TBps"] = bw / 1e12
lines.append(f"copy bandwidth {bw / 1e12:.2f} TB/s")
if not QUANTIZERS:
    shapes = {**LLAMA2_7B_LINEARS, "lm_head": (32000, 4096)}
    lin = {}
    for name, (N, K) in shapes.items():
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) for _ in range(8)]
        x = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
        ref = (x.double() @ ws[0].double().T)
        err = ((G.gemv(x, ws[0]).double() - ref).norm() / ref.norm()).item()
        it = iter(range(10 ** 9))
        t_cublas = graph_time(lambda: F.linear(x, ws[next(it) % 8]), 16)
        t_triton = graph_time(lambda: G.gemv(x, ws[next(it) % 8]), 16)
        best = G._tuned.best_config
        if name in ("qkv", "gate_up"):  # the RMSNorm and residual add fused in front
            nw, res = torch.randn(K, device=dev, dtype=torch.bfloat16), torch.randn(1, K, device=dev, dtype=torch.bfloat16)
            t_fused = graph_time(lambda: G.gemv(x, ws[next(it) % 8], norm_weight=nw, residual=res), 16)
        elif name == "down":  # SiLU-and-mul fused in front
            gu = torch.randn(1, 2 * K, device=dev, dtype=torch.bfloat16)
            t_fused = graph_time(lambda: G.gemv(gu, ws[next(it) % 8], silu_mul=True), 16)
        else:
            t_fused = float("nan")
        nbytes = N * K * 2
        lin[name] = dict(N=N, K=K, cublas_us=t_cublas * 1e6, triton_us=t_triton * 1e6, fused_us=t_fused * 1e6, rel_err=err,
                         cublas_TBps=nbytes / t_cublas / 1e12, triton_TBps=nbytes / t_triton / 1e12, best=str(best))
        del ws
    report["linears"] = lin
    dump()
    for name, r in lin.items():
        lines.append(f"{name:8s} {r['N']}x{r['K']}: cuBLAS {r['cublas_us']:.1f} us ({r['cublas_TBps']:.2f} TB/s), "
                     f"triton {r['triton_us']:.1f} us ({r['triton_TBps']:.2f} TB/s), fused prologue {r['fused_us']:.1f} us, "
                     f"err {r['rel_err']:.1e} [{r['best']}]")
    print("\n".join(lines), flush=True)

# ---- 2. the decode step on the GPU -------------------------------------------------------
from fastllm import Engine, SamplingParams  # noqa: E402
from fastllm.models.context import ForwardContext  # noqa: E402


def replay_time(g, iters: int = 200) -> float:
    g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record(); b.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def kernel_table(fn, steps: int = 5) -> list[tuple[str, float, float]]:
    """(kernel name, GPU us per step, launches per step) of fn() run `steps` times under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kern: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kern.setdefault(e.name, []).append(e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total)
    return sorted(((n, sum(v) / steps, len(v) / steps) for n, v in kern.items()), key=lambda r: -r[1])


def step_profile(quantizer: str) -> None:
    """Part 2 for one quantizer ("bf16": none): graph replay time, and the kernels of a step, both as the
    graph replays them and as an eager forward runs them."""
    eng = Engine(f"dummy:{shape}", progress=False, **({} if quantizer == "bf16" else {"quantizer": quantizer}))
    prompt = {"prompt_token_ids": torch.randint(10, eng.vocab_size - 10, (128,)).tolist()}
    eng.generate(prompt, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    graphs = eng.runner.graphs
    graph, logits = graphs.graphs[1]
    model = eng.runner.model
    t_graph = replay_time(graph)
    t_head = graph_time(lambda: logits.argmax(-1), 10)
    meta = graphs.metas[1]
    ctx = ForwardContext(eng.attention, meta, None)
    ids, pos = graphs.input_ids[:1], graphs.positions[:1]
    with torch.inference_mode():
        for _ in range(3):
            model.compute_logits(model(ids, pos, ctx))
        torch.cuda.synchronize()
        rows = kernel_table(lambda: model.compute_logits(model(ids, pos, ctx)))
    graph_rows = kernel_table(graph.replay)
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    report.setdefault("steps", {})[quantizer] = dict(
        graph_step_us=t_graph * 1e6, argmax_us=t_head * 1e6, weight_bytes=wbytes,
        eager_kernels=[dict(name=n[:120], us_per_step=us, calls_per_step=c) for n, us, c in rows],
        graph_kernels=[dict(name=n[:120], us_per_step=us, calls_per_step=c) for n, us, c in graph_rows])
    dump()
    eng.close()
    lines.append(f"[{quantizer}] decode graph (bs 1, LM head included): {t_graph * 1e6:.0f} us; argmax {t_head * 1e6:.0f} us; "
                 f"floor {wbytes / bw * 1e6:.0f} us ({wbytes / 1e9:.2f} GB)")
    for label, table in [("graph replay", graph_rows), ("eager", rows)]:
        total = sum(r[1] for r in table)
        lines.append(f"  {label} kernels per step: {sum(r[2] for r in table):.0f} launches, {total:.0f} us of kernel time")
        for n, us, c in table[:12]:
            lines.append(f"  {us:8.1f} us {c:5.0f}x  {n[:90]}")
    print("\n".join(lines[-30:]), flush=True)


for q in QUANTIZERS or ["bf16"]:
    step_profile(q)
    torch.cuda.empty_cache()

if not QUANTIZERS:
    # ---- 3. engine latency variants ------------------------------------------------------------
    from fastllm.bench import gpu as B  # noqa: E402
    import fastllm.engine as E  # noqa: E402


    from fastllm.core.cuda_linear import DecodeLinear  # noqa: E402

    variants = {}
    from fastllm.kernels import launch  # noqa: E402

    defaults = DecodeLinear.fuse_norm, DecodeLinear.fuse_silu_mul
    for name, gemv, norm, silu, use_pdl in [("GEMV, norm and SiLU kernels", True, False, False, True),
                                            ("GEMV+silu, norm kernel (default)", True, False, True, True),
                                            ("GEMV+norm+silu", True, True, True, True),
                                            ("GEMV+silu, norm kernel, no PDL", True, False, True, False)]:
        orig = E.use_gemv
        E.use_gemv = orig if gemv else (lambda m: m)
        DecodeLinear.fuse_norm, DecodeLinear.fuse_silu_mul, launch.ENABLED = norm, silu, use_pdl
        try:
            r = B.latency(f"dummy:{shape}")
        finally:
            E.use_gemv = orig
            (DecodeLinear.fuse_norm, DecodeLinear.fuse_silu_mul), launch.ENABLED = defaults, True
        variants[name] = r["rows"][0]
        report["latency"] = variants
        report["floor_tok_s"] = r["floor_tok_s"]
        dump()
        print(f"latency {name}: {r['rows'][0]['tok_s']:.1f} tok/s = {r['rows'][0]['fraction_of_floor']:.1%} of floor "
              f"{r['floor_tok_s']:.0f}", flush=True)
        torch.cuda.empty_cache()
    for name, r in variants.items():
        lines.append(f"latency {name:25s}: {r['tok_s']:.1f} tok/s, {r['ms_per_token']:.3f} ms/token, "
                     f"{r['fraction_of_floor']:.1%} of floor")
print("\n==== summary ====\n" + "\n".join(lines))

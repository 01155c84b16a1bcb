"""Paged-KV Triton kernels on CUDA: correctness vs the float64 reference, CUDA-graph capture, then
speed (triton.testing.do_bench medians) as achieved K/V GB/s against the card's copy bandwidth.
Usage: python scripts/check_kernels.py [--sweep]   (about 1 minute on an H200; --sweep adds split
counts and tile configs, about 2 more)"""
from __future__ import annotations

import math
import sys

import torch
import triton
from triton.testing import do_bench

from fastllm.kernels import paged_attention as pa

MODELS = {"llama-2-7b": (32, 32, 128), "llama-3-8b": (32, 8, 128)}  # heads, kv_heads, head_dim
BLOCK, DTYPE, DEV = 16, torch.bfloat16, "cuda"
BATCHES, CONTEXTS = (1, 8, 64, 256), (256, 2048)
PREFILLS = ((8, 128, 0), (8, 128, 1920), (2, 2048, 0))  # prompts x new tokens, after cached keys


def paged_cache(kv_heads, head_dim, seq_lens, seed=0):
    """Random K/V for seq_lens in shuffled physical blocks (block 0 stays unused, as a null block)."""
    torch.manual_seed(seed)
    need = [math.ceil(n / BLOCK) for n in seq_lens]
    perm = torch.randperm(sum(need), device=DEV) + 1
    tables = torch.zeros(len(seq_lens), max(max(need), 1), dtype=torch.int32, device=DEV)
    at = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[at:at + n]
        at += n
    shape = (sum(need) + 1, BLOCK, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=DTYPE, device=DEV)
    v_cache = torch.randn(shape, dtype=DTYPE, device=DEV)
    return k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32, device=DEV)


def rel_err(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def check_correctness(name, heads, kv_heads, d):
    errs = {}
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 2049, (8,), generator=gen).tolist() + [0]  # the 0 is a padded graph row
    k_cache, v_cache, tables, seq_lens = paged_cache(kv_heads, d, lens)
    q = torch.randn(len(lens), heads, d, dtype=DTYPE, device=DEV)
    cu = torch.arange(len(lens) + 1, dtype=torch.int32, device=DEV)
    ref = pa.reference_attention(q, k_cache, v_cache, tables, cu, seq_lens, d ** -0.5)
    out = torch.full_like(q, float("nan"))
    pa.paged_decode(q, k_cache, v_cache, tables, seq_lens, d ** -0.5, out)
    assert not out.isnan().any() and not out[-1].any(), "decode left NaN or a nonzero padded row"
    errs["decode"] = rel_err(out, ref)

    # Prompts, chunks after cached prefixes, decode rows: one prefill launch.
    q_lens, lens = [128, 128, 77, 128, 1, 1, 300, 5], [128, 1128, 2000, 640, 1, 1500, 300, 16]
    k_cache, v_cache, tables, seq_lens = paged_cache(kv_heads, d, lens, seed=2)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), heads, d, dtype=DTYPE, device=DEV)
    out = torch.full_like(q, float("nan"))
    pa.paged_prefill(q, k_cache, v_cache, tables, cu, seq_lens, d ** -0.5, out, max(q_lens))
    assert not out.isnan().any(), "prefill left NaN"
    errs["prefill"] = rel_err(out, pa.reference_attention(q, k_cache, v_cache, tables, cu, seq_lens, d ** -0.5))

    k = torch.randn(64, kv_heads, d, dtype=DTYPE, device=DEV)
    slots = torch.randperm(k_cache.shape[0] * BLOCK, device=DEV)[:64]
    slots[::7] = -1
    before = k_cache.clone()
    pa.store_kv(k, k, k_cache, v_cache, slots)
    keep = torch.ones(before.shape[0] * BLOCK, dtype=torch.bool, device=DEV)
    keep[slots[slots >= 0]] = False
    assert torch.equal(k_cache.flatten(0, 1)[slots[slots >= 0]], k[slots >= 0]), "store_kv wrote wrong rows"
    assert torch.equal(k_cache.flatten(0, 1)[keep], before.flatten(0, 1)[keep]), "store_kv touched a -1 slot"
    errs["graph"] = check_graph(heads, kv_heads, d)
    print(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()), flush=True)
    return errs


def graph_of(fn):
    """fn captured in a CUDA graph (run once on a side stream first, so Triton compiles outside capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def check_graph(heads, kv_heads, d, batch=8):
    """Capture paged_decode once, replay with new lengths and queries, compare with eager."""
    k_cache, v_cache, tables, seq_lens = paged_cache(kv_heads, d, [1024] * batch, seed=3)
    q = torch.randn(batch, heads, d, dtype=DTYPE, device=DEV)
    out, scratch = torch.empty_like(q), pa.decode_scratch(batch, heads, d, 8, DEV)
    run = lambda: pa.paged_decode(q, k_cache, v_cache, tables, seq_lens, d ** -0.5, out, scratch=scratch)  # noqa: E731
    graph = graph_of(run)
    seq_lens.copy_(torch.tensor([1, 0, 17, 1024, 999, 512, 3, 0][:batch], dtype=torch.int32))
    q.normal_()
    graph.replay()
    got = out.clone()
    run()
    assert torch.equal(got, out), "graph replay differs from eager"
    cu = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
    return rel_err(got, pa.reference_attention(q, k_cache, v_cache, tables, cu, seq_lens, d ** -0.5))


def copy_bandwidth():
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    return 2 * x.numel() / (do_bench(lambda: y.copy_(x)) * 1e-3) / 1e9  # read + write, GB/s


def bench_decode(heads, kv_heads, d, context, num_splits=8):
    """{batch: (eager ms, graph ms, GB/s in the graph)} over one cache of BATCHES[-1] sequences of ~context keys;
    num_splits: an int or a function of the batch."""
    gen = torch.Generator().manual_seed(context)
    lens = torch.randint(context * 9 // 10, context * 11 // 10 + 1, (BATCHES[-1],), generator=gen).tolist()
    k_cache, v_cache, tables, seq_lens = paged_cache(kv_heads, d, lens)
    res = {}
    for b in BATCHES:
        splits = num_splits(b) if callable(num_splits) else num_splits
        q = torch.randn(b, heads, d, dtype=DTYPE, device=DEV)
        out = torch.empty_like(q)
        scratch = pa.decode_scratch(b, heads, d, splits, DEV)
        run = lambda: pa.paged_decode(q, k_cache, v_cache, tables[:b], seq_lens[:b], d ** -0.5, out,  # noqa: E731
                                      num_splits=splits, scratch=scratch)
        eager = do_bench(run)
        graph = graph_of(run)
        ms = do_bench(graph.replay)
        nbytes = 2 * sum(lens[:b]) * kv_heads * d * k_cache.element_size()
        res[b] = (eager, ms, nbytes / (ms * 1e-3) / 1e9)
    return res


def bench_prefill(heads, kv_heads, d, cached=0, n=8, q_len=128):
    """(ms, GB/s of K/V, TFLOP/s) for n prompts of q_len new tokens after `cached` keys each."""
    lens = [cached + q_len] * n
    k_cache, v_cache, tables, seq_lens = paged_cache(kv_heads, d, lens)
    cu = torch.arange(0, n * q_len + 1, q_len, dtype=torch.int32, device=DEV)
    q = torch.randn(n * q_len, heads, d, dtype=DTYPE, device=DEV)
    out = torch.empty_like(q)
    ms = do_bench(lambda: pa.paged_prefill(q, k_cache, v_cache, tables, cu, seq_lens, d ** -0.5, out, q_len))
    nbytes = 2 * sum(lens) * kv_heads * d * k_cache.element_size()
    flops = 4 * n * heads * d * sum(cached + i + 1 for i in range(q_len))  # QK^T and PV, causal keys only
    return ms, nbytes / (ms * 1e-3) / 1e9, flops / (ms * 1e-3) / 1e12


def sweep(module_attrs, configs, fn):
    """Run fn under each config of module constants; return [(config, result)] and restore them."""
    saved = {a: getattr(pa, a) for a in module_attrs}
    results = []
    for cfg in configs:
        for a, v in zip(module_attrs, cfg):
            setattr(pa, a, v)
        results.append((cfg, fn()))
    for a, v in saved.items():
        setattr(pa, a, v)
    return results


def tuning_sweeps(name, h, kvh, d):
    """Rows (model, what, B, eager ms, graph ms, GB/s) over split counts and tile configs (--sweep)."""
    rows = []
    for ctx in CONTEXTS:
        for splits in (1, 2, 4, 8, 16, 32):
            for b, r in bench_decode(h, kvh, d, ctx, num_splits=splits).items():
                rows.append((name, f"decode ctx~{ctx} splits={splits}", b, *r))
    for blk_n, warps in ((16, 4), (32, 4), (64, 4), (32, 2)):
        res = sweep(("DECODE_BLOCK_N", "DECODE_WARPS"), [(blk_n, warps)], lambda: bench_decode(h, kvh, d, CONTEXTS[-1]))
        for b, r in res[0][1].items():
            rows.append((name, f"decode ctx~{CONTEXTS[-1]} BLOCK_N={blk_n} warps={warps}", b, *r))
    cfgs = [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 4, 3), (128, 128, 8, 3)]
    for n, q_len, cached in PREFILLS:
        res = sweep(("PREFILL_BLOCK_M", "PREFILL_BLOCK_N", "PREFILL_WARPS", "PREFILL_STAGES"), cfgs,
                    lambda: bench_prefill(h, kvh, d, cached, n, q_len))
        for cfg, (ms, gbs, tflops) in res:
            what = f"prefill {n}x{q_len} after {cached} M,N,w,s={','.join(map(str, cfg))} {tflops:.0f} TFLOP/s"
            rows.append((name, what, n, ms, float("nan"), gbs))
    print(f"{name} sweeps done", flush=True)
    return rows


def main():
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    errs = {name: check_correctness(name, *shape) for name, shape in MODELS.items()}
    bad = {n: e for n, e in errs.items() if max(e.values()) > 2e-2}
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s (read + write of 1 GiB)", flush=True)

    if "--sweep" in sys.argv:
        rows = [r for name, shape in MODELS.items() for r in tuning_sweeps(name, *shape)]
        print(f"{'model':<11} {'tuning':<58} {'B':>4} {'eager us':>9} {'graph us':>9} {'GB/s':>6} {'%copy':>6}")
        for name, what, b, eager, graph, gbs in rows:
            print(f"{name:<11} {what:<58} {b:>4} {eager * 1e3:>9.1f} {graph * 1e3:>9.1f} {gbs:>6.0f} "
                  f"{100 * gbs / bw:>5.0f}%")

    rows = []  # (model, kernel, B, eager us, graph us at 8 splits, graph us at decode_num_splits, GB/s there)
    for name, (h, kvh, d) in MODELS.items():
        for ctx in CONTEXTS:
            fixed = bench_decode(h, kvh, d, ctx)
            tuned = bench_decode(h, kvh, d, ctx, num_splits=lambda b: pa.decode_num_splits(b, kvh))  # noqa: B023
            for b in BATCHES:
                rows.append((name, f"decode ctx~{ctx} (splits {pa.decode_num_splits(b, kvh)})", b,
                             f"{fixed[b][0] * 1e3:.1f}", f"{fixed[b][1] * 1e3:.1f}", f"{tuned[b][1] * 1e3:.1f}",
                             tuned[b][2]))
        for n, q_len, cached in PREFILLS:
            ms, gbs, tflops = bench_prefill(h, kvh, d, cached, n, q_len)
            rows.append((name, f"prefill {n}x{q_len} after {cached} ({tflops:.0f} TFLOP/s)", n, f"{ms * 1e3:.1f}",
                         "", "", gbs))
        print(f"{name} benchmarks done", flush=True)

    print(f"\n{torch.cuda.get_device_name()}, triton {triton.__version__}: copy {bw:.0f} GB/s; bf16 K/V, block {BLOCK}")
    for name, e in errs.items():
        print(f"  rel. error {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in e.items()))
    print("us: do_bench medians. eager: one paged_decode/paged_prefill call (splits 8, the default); graph: the\n"
          "decode replayed from a CUDA graph with 8 splits; tuned: graph with decode_num_splits. GB/s: K/V\n"
          "bytes read over the tuned time (prefill: eager), against the copy bandwidth.")
    print(f"{'model':<11} {'kernel':<38} {'B':>4} {'eager us':>9} {'graph us':>9} {'tuned us':>9} "
          f"{'GB/s':>6} {'%copy':>6}")
    for name, what, b, eager, graph, tuned, gbs in rows:
        print(f"{name:<11} {what:<38} {b:>4} {eager:>9} {graph:>9} {tuned:>9} {gbs:>6.0f} {100 * gbs / bw:>5.0f}%")
    if bad:
        raise SystemExit(f"FAILED: relative error above 2e-2: {bad}")


if __name__ == "__main__":
    main()

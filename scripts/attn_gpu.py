"""Decode attention with RoPE and the KV store inside (paged_decode_rope, the default) against
rope_store_kv + paged_decode (the previous path), on one GPU, in one process.

1. The kernels alone, graph-timed, Llama-2-7B heads (32 q / 32 kv, 128 dims) and Llama-3-8B heads
   (32 / 8), batch 1-256, 256-8,192 keys per sequence, each path with its split count rounded
   down (the default) and up (the previous default); every fused result checked against the
   previous path's.
2. `fastllm bench latency` at batch 1 with a 2,048-token prompt (--skip-latency), and
3. `fastllm bench throughput` (1,000 requests, Llama-3-8B shape; --skip-throughput), each with the
   default (fused where decode attention splits keys), unfused, and fused in every decode step.

Usage: python scripts/attn_gpu.py OUTDIR [--skip-kernels] [--skip-latency] [--skip-throughput] [--repeats=N]
Prints a table last; JSON in OUTDIR.
"""
import json
import sys

import torch

from fastllm.bench import gpu as B
from fastllm.bench.common import graph_time, script_out_dir
from fastllm.kernels import paged_attention as pa
from fastllm.stages.attention.paged import PagedAttention

out_dir = script_out_dir(__doc__)
dev = torch.device("cuda")
report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
lines: list[str] = []
REPEATS = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--repeats=")), 2)


def dump():
    (out_dir / "attn_gpu.json").write_text(json.dumps(report, indent=1))


def case(B_, H, KVH, D, S, bs=16):
    """A cache of B_ sequences of S keys (this step's included) in shuffled blocks, and one step's qkv."""
    g = torch.Generator(device=dev).manual_seed(0)
    per = -(-S // bs)
    nb = B_ * per + 1
    kc = torch.randn(nb, bs, KVH, D, device=dev, generator=g).to(torch.bfloat16)
    vc = torch.randn(nb, bs, KVH, D, device=dev, generator=g).to(torch.bfloat16)
    tables = (torch.randperm(nb - 1, device=dev, generator=g)[:B_ * per] + 1).view(B_, per).to(torch.int32)
    seq_lens = torch.full((B_,), S, dtype=torch.int32, device=dev)
    last = S - 1
    slots = tables[:, last // bs].long() * bs + last % bs
    positions = torch.full((B_,), last, device=dev)
    qkv = torch.randn(B_, H + 2 * KVH, D, device=dev, generator=g).to(torch.bfloat16)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=dev).float() / D))
    return dict(kc=kc, vc=vc, tables=tables, seq_lens=seq_lens, slots=slots, positions=positions, qkv=qkv,
                inv_freq=inv_freq, H=H, KVH=KVH, D=D)


def run_path(c, fused, splits):
    H, KVH, D = c["H"], c["KVH"], c["D"]
    qk, v = c["qkv"][:, :H + KVH], c["qkv"][:, H + KVH:]
    out = torch.empty(qk.shape[0], H, D, dtype=torch.bfloat16, device=dev)
    scratch = pa.decode_scratch(qk.shape[0], H, D, splits, dev)
    scale = D ** -0.5
    if fused:
        def fn():
            pa.paged_decode_rope(qk, v, c["kc"], c["vc"], c["tables"], c["seq_lens"], c["slots"], c["positions"],
                                 c["inv_freq"], 1.0, scale, out, splits, scratch)
    else:
        q = torch.empty(qk.shape[0], H + KVH, D, dtype=torch.bfloat16, device=dev)

        def fn():
            q.copy_(qk)  # rope_store_kv rotates q in place: a fresh copy each call (timed for both paths)
            pa.rope_store_kv(q, v, c["kc"], c["vc"], c["slots"], c["positions"], c["inv_freq"], 1.0, H)
            pa.paged_decode(q[:, :H], c["kc"], c["vc"], c["tables"], c["seq_lens"], scale, out, splits, scratch)
    return fn, out


if "--skip-kernels" not in sys.argv:
    rows = []
    for name, (H, KVH) in {"llama-2-7b": (32, 32), "llama-3-8b": (32, 8)}.items():
        for B_ in (1, 8, 64, 256):
            for S in (256, 2048, 8192):
                if B_ * S > 256 * 2048:
                    continue
                c = case(B_, H, KVH, 128, S)
                splits = {}
                for rnd in ("down", "up"):
                    pa.SPLITS_ROUND_DOWN = rnd == "down"
                    splits[rnd] = pa.decode_num_splits(B_, KVH, dev)
                pa.SPLITS_ROUND_DOWN = True
                row = {"model": name, "batch": B_, "keys": S, "splits": splits}
                ref_fn, ref_out = run_path(c, False, splits["up"])
                ref_fn()
                want = ref_out.float().clone()
                for fused in (True, False):
                    for rnd in ("down", "up"):
                        fn, out = run_path(c, fused, splits[rnd])
                        key = f"{'fused' if fused else 'unfused'} {rnd}"
                        row[key + " us"] = graph_time(fn) * 1e6
                        if fused:
                            fn()
                            row[key + " err"] = (out.float() - want).abs().max().item()
                rows.append(row)
                report["kernels"] = rows
                dump()
                line = (f"{name} B={B_:3d} keys={S:5d} splits {splits['down']:2d}/{splits['up']:2d}: "
                        + "  ".join(f"{k.removesuffix(' us')} {row[k]:7.1f}us" for k in row if k.endswith(" us"))
                        + f"  (max err {max(row[k] for k in row if k.endswith(' err')):.1e})")
                lines.append(line)
                print(line, flush=True)


def both(label, call):
    res = {}
    for fused, rnd in ((True, "down"), (False, "up"), ("always", "down")):
        PagedAttention.fuse_rope_decode = fused
        pa.SPLITS_ROUND_DOWN = rnd == "down"
        r = call()
        res[f"fused={fused} splits={rnd}"] = r
        report[label] = res
        dump()
        row = r["rows"][0]
        value = row.get("output_tok_s") or row.get("tok_s")
        line = f"{label} fused={fused!s:6} splits rounded {rnd:4}: {value:9.1f} tok/s  {row}"
        lines.append(line[:200])
        print(line, flush=True)
        torch.cuda.empty_cache()
    PagedAttention.fuse_rope_decode, pa.SPLITS_ROUND_DOWN = True, True


if "--skip-latency" not in sys.argv:
    both("latency b1 prompt 2048", lambda: B.latency("dummy:llama-2-7b", batch=1, input_len=2048, output_len=128,
                                                     options={"max_num_seqs": 1}))
if "--skip-throughput" not in sys.argv:
    both("throughput", lambda: B.throughput("dummy:llama-3-8b", repeats=REPEATS))
print("\n==== summary ====\n" + "\n".join(lines))

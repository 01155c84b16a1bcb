"""Shared pieces of `fastllm bench`: the copy-bandwidth floor, HF baselines, JSON and plots."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch


def script_out_dir(usage: str) -> Path:
    """The GPU scripts' first argument, OUTDIR (default "."), created; with -h / --help, print
    `usage` and exit instead."""
    import sys

    if {"-h", "--help"} & set(sys.argv[1:]):
        sys.exit(print(usage))
    out = Path(sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else ".")
    out.mkdir(parents=True, exist_ok=True)
    return out


# The linear layers of one Llama-2-7B decoder layer, (N, K) of y = W x, as the GPU scripts time them
LLAMA2_7B_LINEARS = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
# and of Llama-3-8B (grouped key/value heads), the throughput benchmark's model
LLAMA3_8B_LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """The card's copy ceiling in bytes/s (bytes read + bytes written): the best of `repeats`
    device-to-device copies of nbytes / 2, timed with CUDA events after a warm-up (a ceiling is
    what the card can do; slower repeats are noise: clocks ramping, other work)."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    for _ in range(5):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * (nbytes // 2) / min(times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, tied tensors counted once (opaque packed CPU weights too)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = id(t) if t.is_mkldnn else t.data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def hf_model(shape: str, dtype: torch.dtype, device: torch.device):
    """HF transformers' model of a dummy shape with random weights, for the baseline."""
    from transformers import AutoModelForCausalLM

    from ..stages.loaders.dummy import shape_config

    cfg = shape_config(shape)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save(result: dict, json_path: str | None, plot_path: str | None, title: str, bars: dict[str, float]) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=1))
    if plot_path:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot written")
            return
        fig, ax = plt.subplots(figsize=(7, 3.2))
        names = list(bars)
        ax.barh(names, [bars[n] for n in names], color=["#3b7dd8" if "fastllm" in n else "#999" for n in names])
        for i, n in enumerate(names):
            ax.text(bars[n], i, f" {bars[n]:,.0f}", va="center")
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        fig.tight_layout()
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot_path, dpi=120)


def graph_time(fn, iters: int = 16, replays: int = 10, warmup: int = 3) -> float:
    """Seconds per fn() call on CUDA: the median over `replays` of a CUDA graph of `iters` calls
    (warmed up eagerly on a side stream first, so autotuning and compiling stay outside)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / iters)
    return statistics.median(times)


def print_layer_sums(rows: list[dict], lines: list[str], keys=None) -> None:
    """The per-layer scripts' last table: their lines, then per token count (row["M"]) each
    candidate's time (row["us"]) summed over the layers, against bf16's (keys: the candidates
    shown, all when None)."""
    sums: dict = {}
    for r in rows:
        for k, v in r["us"].items():
            sums.setdefault(r["M"], {}).setdefault(k, 0.0)
            sums[r["M"]][k] += v
    print("\n==== summary ====\n" + "\n".join(lines))
    for M, t in sums.items():
        print(f"four layers, M={M:4d}: " + " ".join(f"{k} {t[k]:6.1f}us ({t['bf16'] / t[k]:.2f}x)" for k in keys or t))

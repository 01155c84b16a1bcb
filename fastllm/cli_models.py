"""The `fastllm` commands that make or measure a model: quantize, prune (each saves the transformed
model), distill, eval (perplexity) and bench. fastllm.cli builds their options and dispatches to them;
torch and the engine are imported inside, as there.
"""
from __future__ import annotations

import argparse
import json

from .errors import ConfigError, describe_validation_error


def _transform_and_save(args: argparse.Namespace, command: str) -> int:
    """`fastllm quantize` and `fastllm prune`: load, apply the pruner and the quantizer once, save."""
    from pydantic import ValidationError

    from . import registry
    from .config import EngineConfig
    from .core.context import load_context, load_model
    from .stages.quantizers.saved import save_quantized

    from .cli import _options

    try:
        config = EngineConfig(model=args.model, **_options(args))
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from e
    if command == "quantize" and config.quantizer.name == "none":
        raise ConfigError("fastllm quantize needs --quantizer (e.g. int8, or '{\"name\": \"int4\", \"group_size\": 64}')")
    if command == "prune" and config.pruner.name == "none":
        raise ConfigError("fastllm prune needs --pruner (e.g. wanda, or '{\"name\": \"magnitude\", \"sparsity\": 0.5}')")
    pruner = dict(config.pruner.options)
    if config.pruner.name == "2:4":  # saved dense with its zeros; loading with pruner 2:4 makes it sparse again
        pruner["storage"] = "masked"
    ctx = load_context(config)
    loaded = load_model(config, ctx)
    model = registry.create("pruner", config.pruner.name, pruner).apply(loaded.model, ctx)
    model = registry.create("quantizer", config.quantizer.name, config.quantizer.options).apply(model, ctx)
    extra = {"pruner": {"name": config.pruner.name, **pruner}} if config.pruner.name != "none" else {}
    out = save_quantized(model, loaded.tokenizer, {"name": config.quantizer.name, **config.quantizer.options},
                         args.out_dir, extra)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    what = " and ".join(f"{n}-{verb}" for n, verb in ((config.pruner.name, "pruned"), (config.quantizer.name, "quantized"))
                        if n != "none")
    print(f"saved {what} {loaded.name} to {out} ({size / 2**20:.1f} MiB); "
          f"load it with Engine({str(out)!r}) or --model {out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    return _transform_and_save(args, "quantize")


def cmd_prune(args: argparse.Namespace) -> int:
    return _transform_and_save(args, "prune")


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import distill
    from .engine import Engine
    from .eval import perplexity

    try:
        layers = [int(x) for x in args.layers.split(",")] if "," in args.layers else int(args.layers)
    except ValueError:
        raise ConfigError(f"--layers takes a count or comma-separated indices, got {args.layers!r}") from None
    res = distill(args.out_dir, args.teacher, layers=layers, intermediate_size=args.intermediate_size,
                  text_file=args.text, eval_tokens=args.eval_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                  steps=args.steps, lr=args.lr, temperature=args.temperature, alpha=args.alpha,
                  checkpoint_every=args.checkpoint_every, resume=not args.no_resume,
                  max_seconds=args.max_minutes * 60 if args.max_minutes else None, device=args.device)
    print(f"distilled {res.steps} steps ({res.tokens_seen} tokens, {res.seconds:.0f} s, stopped by {res.stopped}) "
          f"into {res.out_dir}")
    report = res.to_dict()
    if args.text is None and args.eval_tokens >= 2:  # the held-out head of the default text
        from pathlib import Path

        for name, path in (("teacher", args.teacher), ("student before", str(Path(args.out_dir) / "initial")),
                           ("student after", args.out_dir)):
            if name == "student before" and not Path(path).exists():
                continue
            where = {} if args.device == "auto" else {"device": args.device}
            with Engine(path, dtype="float32", progress=False, **where) as e:
                ppl = perplexity(e, max_tokens=args.eval_tokens).perplexity
            report[f"perplexity {name}"] = ppl
            print(f"perplexity {name:15s} {ppl:10.3f}  (first {args.eval_tokens} tokens of the default text)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .cli import _engine, _options
    from .eval import perplexity

    text = source = None
    if args.file:
        try:
            text, source = open(args.file, encoding="utf-8").read(), args.file
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --file {args.file!r}: {e}") from e
    with _engine(args) as engine:
        res = perplexity(engine, text, context=args.context, max_tokens=args.max_tokens or None, source=source)
    print(f"perplexity {res.perplexity:.4f}  ({res.num_tokens} tokens in {res.num_windows} windows of "
          f"{res.context}, {res.seconds:.1f} s; {res.source})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res.to_dict() | {"options": _options(args), "model": args.model}, f, indent=1)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.workload in ("latency", "throughput"):
        return _bench_gpu(args)
    from .bench import cpu

    result = cpu.run(new_tokens=args.new_tokens, prompt_len=args.prompt_len, repeats=args.repeats,
                     dtypes=tuple(args.dtype or ("float32", "bfloat16")), compare=not args.no_compare)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(cpu.table(result))
    return 0


def _bench_gpu(args: argparse.Namespace) -> int:
    from .bench import common, gpu
    from .cli import _options

    opts = _options(args)
    compare = args.compare == "transformers"
    if args.perplexity is not None and (args.perplexity < 2 or (args.model or "").startswith("dummy:")):
        raise ConfigError("--perplexity N needs N >= 2 and a real model (dummy shapes have random weights and no "
                          f"tokenizer), got {args.perplexity} tokens of {args.model!r}")
    if args.workload == "latency":
        res = gpu.latency(args.model, args.batch, args.input_len, args.output_len, args.repeats, compare, opts,
                          args.perplexity)
        floor = res["floor_tok_s"]
        print(f"{res['device']}  {args.model}  batch {args.batch}  floor {floor:.1f} tok/s per sequence "
              f"({res['weight_bytes'] / 1e9:.2f} GB at {res['copy_bandwidth_Bps'] / 1e12:.2f} TB/s)")
        print(f"{'engine':<24}{'ms/token':>10}{'tok/s':>10}{'of floor':>10}")
        for r in res["rows"]:
            print(f"{r['engine']:<24}{r['ms_per_token']:>10.2f}{r['tok_s']:>10.1f}{r['seq_tok_s'] / floor:>10.0%}")
        bars, title = {r["engine"]: r["tok_s"] for r in res["rows"]}, "decode tok/s"
    else:
        res = gpu.throughput(args.model, args.num_requests, args.input_len, args.output_len, args.mix,
                             compare, args.compare_requests, opts, args.repeats, args.perplexity)
        print(f"{res['device']}  {args.model}  mix {args.mix}")
        print(f"{'engine':<30}{'requests':>9}{'output tok/s':>14}{'total tok/s':>13}")
        for r in res["rows"]:
            print(f"{r['engine']:<30}{r['requests']:>9}{r['output_tok_s']:>14.0f}{r['total_tok_s']:>13.0f}")
        bars, title = {r["engine"]: r["output_tok_s"] for r in res["rows"]}, "output tok/s"
    if res["perplexity"]:
        p = res["perplexity"]
        print(f"fastllm perplexity {p['perplexity']:.4f} ({p['num_tokens']} tokens in windows of {p['context']}; "
              f"{p['source']})")
    common.save(res, args.json, args.plot, f"{res['device']} {args.model} {args.workload}: {title}", bars)
    return 0

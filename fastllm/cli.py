"""The `fastllm` command: its options, and generate, chat and plugins over the same API as
`Engine` (the commands that make or measure a model, quantize to bench, are in fastllm.cli_models).

Engine (and so torch) is imported inside the commands, so `fastllm plugins` and `--help`
answer at once.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .cli_models import cmd_bench, cmd_distill, cmd_eval, cmd_prune, cmd_quantize
from .errors import ConfigError, FastLLMError, InvalidRequestError, describe_validation_error

STAGES = ("loader", "quantizer", "pruner", "parallelizer", "attention", "batcher", "speculator")
SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "ignore_eos")


def _stage(value: str) -> str | dict:
    """A stage option: a name (`int8`) or a JSON object (`{"name": "int4", "group_size": 64}`)."""
    if not value.lstrip().startswith("{"):
        return value
    try:
        spec = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(
            f"invalid JSON {value!r} ({e.msg} at column {e.colno}); give a name like 'int8' "
            f"or an object like '{{\"name\": \"int4\", \"group_size\": 64}}'") from None
    if not isinstance(spec, dict):
        raise argparse.ArgumentTypeError(f"{value!r} is not a JSON object with a 'name' key")
    return spec


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", help="HF model dir, .gguf file or 'dummy:<shape>' (default: embedded SmolLM2-135M)")
    for stage in STAGES:
        g.add_argument(f"--{stage}", type=_stage, metavar="NAME|JSON",
                       help=f"{stage} stage: a name, or a JSON object with 'name' and options")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", help="'auto' (default), 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument("--max-model-len", type=int, metavar="N")
    g.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="any other EngineConfig field, e.g. max_num_seqs=256 or async_scheduling=false (repeatable)")


def _setting(value: str) -> tuple[str, object]:
    """`key=value`, the value read as JSON when it parses (numbers, true/false, null), else a string."""
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {value!r}")
    try:
        return key.replace("-", "_"), json.loads(raw)
    except json.JSONDecodeError:
        return key.replace("-", "_"), raw


def _add_sampling_options(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, metavar="N")
    g.add_argument("--temperature", type=float, default=temperature, metavar="T", help=f"0 is greedy (default {temperature})")
    g.add_argument("--top-p", type=float, metavar="P")
    g.add_argument("--top-k", type=int, metavar="K")
    g.add_argument("--min-p", type=float, metavar="P")
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="extend", nargs="+", metavar="STR", help="stop strings (not included in the output)")
    g.add_argument("--ignore-eos", action="store_true", default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastllm", description="Fast LLM inference on your own hardware.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = sub.add_parser("generate", help="complete one prompt, streaming the text to stdout")
    gen.add_argument("prompt")
    _add_sampling_options(gen, max_tokens=64, temperature=0.0)
    _add_engine_options(gen)
    chat = sub.add_parser("chat", help="talk to the model: one message per line, /exit or EOF ends")
    _add_sampling_options(chat, max_tokens=256, temperature=0.7)
    _add_engine_options(chat)
    sub.add_parser("plugins", help="list every stage implementation and the package it comes from")
    bench = sub.add_parser("bench", help="measure speed beside a baseline, in the same process")
    work = bench.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")
    cpu = work.add_parser("cpu", help="batch-1 decode of the embedded model beside HF transformers' generate")
    cpu.add_argument("--new-tokens", type=int, default=128, metavar="N")
    cpu.add_argument("--prompt-len", type=int, default=64, metavar="N")
    cpu.add_argument("--repeats", type=int, default=5, metavar="N")
    cpu.add_argument("--dtype", action="append", choices=["float32", "bfloat16"], help="repeatable (default: both)")
    cpu.add_argument("--no-compare", action="store_true", help="skip the transformers baseline")
    cpu.add_argument("--json", metavar="PATH", help="also write the raw result as JSON")
    lat = work.add_parser("latency", help="one batch, greedy, EOS ignored: decode speed against the bandwidth floor")
    lat.add_argument("--batch", type=int, default=1)
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=256)
    lat.add_argument("--repeats", type=int, default=3)
    thr = work.add_parser("throughput", help="many requests at once: output and total tok/s")
    thr.add_argument("--num-requests", type=int, default=1000)
    thr.add_argument("--input-len", type=int, default=128)
    thr.add_argument("--output-len", type=int, default=128)
    thr.add_argument("--mix", choices=["fixed", "sharegpt"], default="fixed",
                     help="fixed lengths, or a synthetic ShareGPT-like long-tailed mix")
    thr.add_argument("--compare-requests", type=int, default=256, help="requests given to the HF baseline")
    thr.add_argument("--repeats", type=int, default=3, help="timed runs (median), each on a cold prefix cache")
    for p, default in ((lat, "dummy:llama-2-7b"), (thr, "dummy:llama-3-8b")):
        p.add_argument("--compare", choices=["transformers"], help="run this baseline in the same process")
        p.add_argument("--json", metavar="PATH")
        p.add_argument("--plot", metavar="PNG")
        p.add_argument("--perplexity", type=int, metavar="N", help="also the perplexity of this configuration on the "
                       "first N tokens of `fastllm eval perplexity`'s default text (a real model: dummy shapes have "
                       "random weights and no tokenizer)")
        _add_engine_options(p)
        p.set_defaults(model=default)
    qz = sub.add_parser("quantize", help="quantize a model once and save it; Engine(OUT_DIR) then loads it fast")
    pr = sub.add_parser("prune", help="prune a model once (and quantize it, with --quantizer) and save it as safetensors")
    for p in (qz, pr):
        p.add_argument("out_dir", metavar="OUT_DIR")
        _add_engine_options(p)
    ds = sub.add_parser("distill", help="train a smaller student to match a teacher's next-token distribution")
    ds.add_argument("out_dir", metavar="OUT_DIR")
    ds.add_argument("--teacher", metavar="MODEL", help="HF directory or .gguf file (default: the embedded SmolLM2)")
    ds.add_argument("--layers", default="6", metavar="N|I,J,..",
                    help="student decoder layers: a count spread over the teacher's depth, or teacher indices")
    ds.add_argument("--intermediate-size", type=int, metavar="N", help="narrower MLPs (default: the teacher's)")
    ds.add_argument("--text", metavar="PATH", help="training text (default: pydoc topics after its first --eval-tokens)")
    ds.add_argument("--eval-tokens", type=int, default=8192, metavar="N",
                    help="tokens of the default text kept out of training and scored before and after (8192)")
    ds.add_argument("--steps", type=int, default=300)
    ds.add_argument("--seq-len", type=int, default=256)
    ds.add_argument("--batch-size", type=int, default=4)
    ds.add_argument("--lr", type=float, default=2e-4)
    ds.add_argument("--temperature", type=float, default=2.0)
    ds.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term; 1 - alpha on the LM loss")
    ds.add_argument("--checkpoint-every", type=int, default=50, metavar="STEPS")
    ds.add_argument("--max-minutes", type=float, metavar="M", help="stop (and save) after this long")
    ds.add_argument("--no-resume", action="store_true", help="start over even if OUT_DIR holds a checkpoint")
    ds.add_argument("--device", default="auto")
    ds.add_argument("--json", metavar="PATH", help="write the run's result and perplexities as JSON")
    ev = sub.add_parser("eval", help="quality of an engine configuration")
    evw = ev.add_subparsers(dest="metric", required=True, metavar="METRIC")
    ppl = evw.add_parser("perplexity", help="perplexity on a text file (default: Python's pydoc_data/topics.py)")
    ppl.add_argument("--file", metavar="PATH", help="a UTF-8 text file (default: pydoc_data/topics.py)")
    ppl.add_argument("--context", type=int, default=512, metavar="N", help="tokens per scored window (512)")
    ppl.add_argument("--max-tokens", type=int, default=8192, metavar="N", help="tokens of the text used (8192; 0: all)")
    ppl.add_argument("--json", metavar="PATH")
    _add_engine_options(ppl)
    return parser


def _options(args: argparse.Namespace) -> dict:
    opts = {k: getattr(args, k) for k in (*STAGES, "dtype", "device", "max_model_len") if getattr(args, k) is not None}
    return opts | dict(args.set)


def _engine(args: argparse.Namespace):
    from pydantic import ValidationError

    from .config import EngineConfig
    from .engine import Engine

    opts = _options(args)
    try:
        config = EngineConfig(model=args.model, **opts)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e)) from e
    return Engine(config=config)


def _sampling(args: argparse.Namespace):
    from pydantic import ValidationError

    from .sampling import SamplingParams

    try:
        return SamplingParams(**{k: getattr(args, k) for k in SAMPLING if getattr(args, k) is not None})
    except ValidationError as e:
        raise InvalidRequestError(f"invalid sampling option: {describe_validation_error(e)}") from e


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args)  # before the engine: a typo should not cost a model load
    with _engine(args) as engine:
        for chunk in engine.stream(args.prompt, params):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling(args)
    interactive = sys.stdin.isatty()
    messages: list[dict[str, Any]] = []
    with _engine(args) as engine:
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line.rstrip("\n")})
            try:
                chunks = engine.stream_chat(messages, params)
                reply = []
                for chunk in chunks:
                    reply.append(chunk.text)
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
            except InvalidRequestError as e:  # e.g. the history outgrew the context: drop this turn
                messages.pop()
                print(f"error: {e}", file=sys.stderr)
                continue
            messages.append({"role": "assistant", "content": "".join(reply)})
            sys.stdout.write("\n")
            sys.stdout.flush()
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from . import registry

    rows = [("STAGE", "GROUP", "NAME", "DISTRIBUTION", "VERSION", "TARGET")]
    for stage, group in registry.GROUPS.items():
        for name, info in sorted(registry.discover(stage).items()):
            rows.append((stage, group, name, info.dist, info.version, info.target))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "plugins": cmd_plugins, "bench": cmd_bench,
            "eval": cmd_eval, "quantize": cmd_quantize, "prune": cmd_prune, "distill": cmd_distill}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2)
        return e.code if isinstance(e.code, int) else 2
    if args.command != "plugins":  # the engine says what it sized and captured at start
        import logging

        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return COMMANDS[args.command](args)
    except FastLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

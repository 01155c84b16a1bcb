"""The Engine: builds the stage stack once, then serves requests from many threads and tasks.

A background thread owns the model and runs `step()` while there is work; callers validate and
tokenize in their own thread, hand requests over, and receive deltas through a sink.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from typing import Any

import torch
from pydantic import ValidationError

from . import registry
from .config import EngineConfig
from .core import cpu
from .core.context import load_context, load_model
from .core.cuda_graphs import DecodeGraphs
from .core.cuda_linear import use_gemv
from .core.inputs import InputProcessor
from .core.model_runner import ModelRunner
from .core.inflight import InFlight
from .core.request import PENDING, Request, Status
from .core.sampler import Sampler
from .engine_api import RequestAPI
from .errors import ConfigError, EngineClosedError, EngineStepError, describe_validation_error
from .outputs import StreamChunk
from .stages.base import KVSpec, LoadContext

log = logging.getLogger("fastllm")
# Decode steps of up to this many sequences replay CUDA graphs (fastllm.core.cuda_graphs.ladder);
# larger ones run eagerly. At 512, a 1,000-request throughput run's decode steps (~1,000
# sequences) ran eagerly; capturing up to 1,024 took int8's W8A8 mode from 15,400-17,200 to
# 21,400 output tok/s on an H100, and bf16 from 16,400 to 16,900 (docs/quantization-log.md).
MAX_GRAPH_BATCH = 1024
def _engine_thread(ref: "weakref.ref[Engine]", cv: threading.Condition) -> None:
    """The engine thread. It holds the engine only while there is work, so an engine dropped
    without close() is garbage-collected, and its memory freed, once idle."""
    while True:
        with cv:
            while True:
                engine = ref()
                if engine is None:
                    return
                if engine._has_input():
                    break
                del engine
                cv.wait(timeout=1.0)
        if not engine._iterate():
            return
        del engine


def _release_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # cuBLAS keeps one per stream it ran on
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()


class Engine(RequestAPI):
    """`Engine()` runs the embedded default model; `Engine("path", quantizer="int8", ...)` or
    `Engine(config=EngineConfig(...))` any other. Use it as a context manager, or call close()."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **options: Any):
        if config is not None and (model is not None or options):
            raise ConfigError("pass either config=EngineConfig(...) or a model and options, not both")
        if config is None:
            try:
                config = EngineConfig(model=model, **options)
            except ValidationError as e:
                raise ConfigError(f"invalid engine options: {describe_validation_error(e)}") from e
        self.config = config
        ctx = load_context(config)
        self.device, self.dtype = ctx.device, ctx.dtype
        self._build(config, ctx)
        self._requests: dict[str, Request] = {}  # engine thread only
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._cv = threading.Condition()
        self._step_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=_engine_thread, args=(weakref.ref(self), self._cv),
                                        name="fastllm-engine", daemon=True)
        self._thread.start()
        weakref.finalize(self, _release_device_memory, self.device).atexit = False

    # ---- construction -------------------------------------------------------------------
    def _build(self, config: EngineConfig, ctx: LoadContext) -> None:
        loaded = load_model(config, ctx)
        model = loaded.model
        for stage in ("pruner", "quantizer", "parallelizer"):
            spec = getattr(config, stage)
            model = registry.create(stage, spec.name, spec.options).apply(model, ctx)
        if self.device.type == "cpu" and cpu.can_pack():
            cpu.pack_linears(model)
        elif self.device.type == "cuda":  # batch-1 decode through our GEMV
            use_gemv(model)
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.max_model_len = config.max_model_len or loaded.max_model_len
        if self.max_model_len > loaded.max_model_len:
            raise ConfigError(f"max_model_len={self.max_model_len} exceeds the model's context "
                              f"({loaded.max_model_len}); use a value <= {loaded.max_model_len}")
        self.vocab_size = model.config.vocab_size
        layers, heads, kv_heads, head_dim = model.attn_shape
        cuda = self.device.type == "cuda"
        # the GPU fast path by default on CUDA; the lean baseline (fastest at batch 1) on the CPU
        attention = config.attention.name if config.attention.name != "auto" else ("paged" if cuda else "sdpa")
        batcher = config.batcher.name if config.batcher.name != "auto" else ("continuous" if cuda else "static")
        max_seqs = config.max_num_seqs or (1024 if cuda else 16)
        self.attention = registry.create("attention", attention, config.attention.options)
        self.attention.setup(KVSpec(layers, heads, kv_heads, head_dim, self.dtype, self.device, head_dim ** -0.5))
        self.batcher = registry.create("batcher", batcher, config.batcher.options)
        self.batcher.setup(self.attention, max_seqs, config.max_num_batched_tokens or (16384 if cuda else 2048))
        if hasattr(self.attention, "describe"):
            log.info(self.attention.describe(self.max_model_len))
        self.speculator = registry.create("speculator", config.speculator.name, config.speculator.options)
        self.sampler = Sampler(self.device, config.seed)
        graphs = None
        if cuda and config.cuda_graphs and hasattr(self.attention, "decode_meta"):
            graphs = DecodeGraphs(model, self.attention, self.device, min(max_seqs, MAX_GRAPH_BATCH),
                                  -(-self.max_model_len // self.attention.block_size), model.config.hidden_size, self.dtype)
            graphs.capture()
            log.info("captured CUDA graphs for decode batch sizes %s in %.1f s", graphs.sizes, graphs.capture_seconds)
        self.runner = ModelRunner(model, self.attention, self.device, graphs)
        overlap = config.async_scheduling if config.async_scheduling is not None else cuda
        self._overlap = overlap and getattr(self.batcher, "overlap", False)
        self._inflight: InFlight | None = None
        self.inputs = InputProcessor(self.tokenizer, self.model_name, self.vocab_size, self.max_model_len,
                                     getattr(self.attention, "capacity_tokens", None), self.device)

    # ---- the step -----------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration: schedule, run the model, sample, update the requests. False when
        nothing could be scheduled. Overlapped (async_scheduling): the step's sampled ids are
        read back during the next call, after that call has queued its own step."""
        prev, self._inflight = self._inflight, None
        if prev is not None and prev.needs_sync:  # penalties read every past token: no overlap
            self._resolve(prev)
            prev = None
        batch = self.batcher.schedule()
        if batch is None:
            if prev is None:
                return False
            self._resolve(prev)
            return True
        rows = batch.sampling()
        logits = self.runner.run(batch, rows, prev.ids if prev is not None else None)
        sampled = [batch.requests[i] for i in rows]
        launched = InFlight(batch, sampled, self.sampler(logits, sampled) if rows else None)
        if prev is not None:
            self._resolve(prev)  # host bookkeeping while the device runs the step just launched
        if self._overlap:
            self._inflight = launched
        else:
            self._resolve(launched)
        return True

    def _resolve(self, step: InFlight) -> None:
        tokens = step.tokens()  # the step's one sync
        self.batcher.update(step.batch)
        for req, i, tok in zip(step.sampled, step.index, tokens):
            if req.status is Status.FINISHED:  # aborted, or ended by the step before
                continue
            if i < len(req.token_ids):
                req.token_ids[i] = tok
            else:
                req.token_ids.append(tok)
            self._append(req, tok, i + 1)

    def _append(self, req: Request, tok: int, length: int) -> None:
        m = req.metrics
        m.num_generated_tokens += 1
        if m.first_token_time is None:
            m.first_token_time = time.perf_counter()
        hit_stop = req.detokenizer.add(tok) if req.detokenizer is not None else False
        p = req.params
        reason = None
        if hit_stop or tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids):
            reason = "stop"
        elif length >= req.max_tokens_total:  # max_tokens, or max_model_len
            reason = "length"
        text = req.detokenizer.delta(final=reason is not None) if req.detokenizer is not None else ""
        req.text += text
        if reason is None:
            if req.stream:
                req.sink(StreamChunk(req.id, text, [tok]))
        else:
            del req.token_ids[length:]  # a PENDING token fed to the step still in flight
            self._finish(req, reason, StreamChunk(req.id, text, [tok], reason))

    def _finish(self, req: Request, reason: str, last: StreamChunk | BaseException) -> None:
        if req.token_ids and req.token_ids[-1] == PENDING:  # aborted with a token in flight
            req.token_ids.pop()
        req.finish_reason = reason
        req.metrics.finished_time = time.perf_counter()
        self.batcher.finish(req)
        req.status = Status.FINISHED
        self._requests.pop(req.id, None)
        req.sink(last)

    # ---- the engine thread --------------------------------------------------------------
    def _has_input(self) -> bool:
        return bool(self._inbox or self._aborts or self._closed or self._inflight or self.batcher.has_work())

    def _iterate(self) -> bool:
        """One turn of the engine thread: take new requests and aborts, run a step. False once
        the engine is closed (everything in flight is then aborted)."""
        with self._cv:
            if self._closed:
                self._inflight = None
                for req in list(self._requests.values()) + self._inbox:
                    self._finish(req, "abort", StreamChunk(req.id, "", [], "abort"))
                self._inbox = []
                return False
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        for req in new:
            self._requests[req.id] = req
            self.batcher.add(req)
        for rid in aborts:
            if rid in self._requests:
                self._finish(self._requests[rid], "abort", StreamChunk(rid, "", [], "abort"))
        with self._step_lock:
            try:
                ran = self.step()
            except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving
                self._fail_running(e)
                ran = True
        if not ran:  # work waits on memory another request holds: do not spin
            with self._cv:
                self._cv.wait(timeout=0.005)
        return True

    def _fail_running(self, exc: Exception) -> None:
        err = EngineStepError(f"the model step failed: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        self._inflight = None
        # the running, and any waiting with a token in flight (preempted one step ahead)
        failed = [r for r in self._requests.values() if r.status == Status.RUNNING or r.token_ids[-1] == PENDING]
        for req in failed:
            self._finish(req, "abort", err)

    def _submit(self, req: Request) -> None:
        with self._cv:
            if self._closed:
                raise EngineClosedError("the engine is closed; build a new Engine")
            self._inbox.append(req)
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with finish_reason 'abort'. Unknown ids are ignored."""
        with self._cv:
            if not self._closed:
                self._aborts.append(request_id)
                self._cv.notify()

    def _make_request(self, prompt: Any, params: Any, sink, add_special_tokens: bool = True) -> Request:
        if self._closed:
            raise EngineClosedError("the engine is closed; build a new Engine")
        return self.inputs.request(prompt, params, sink, add_special_tokens)

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits [T, V] (fp32) at every position of one token sequence, for evaluation."""
        if self._closed:
            raise EngineClosedError("the engine is closed; build a new Engine")
        with self._step_lock:
            return self.runner.prompt_logits(token_ids)

    def close(self) -> None:
        """Abort what is in flight, stop the engine thread, and give back all device memory."""
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify()
        self._thread.join()
        for name in ("runner", "attention", "batcher", "speculator", "sampler"):
            setattr(self, name, None)
        _release_device_memory(self.device)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

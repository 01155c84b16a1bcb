"""Knowledge distillation: train a smaller student to match a teacher's next-token distribution.

The student is built from the teacher (DistilBERT's recipe, FIELD-NOTES section 9): the same
tokenizer, embeddings, final norm and LM head, a subset of the decoder layers spread evenly over
the depth (`layers`), optionally narrower MLPs (`intermediate_size`: the neurons whose weights
have the largest norms are kept). It is trained on a text file with

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, next token)

(Hinton et al. 2015), the teacher's logits computed on the fly. The model is HF transformers'
(both sides), so anything transformers trains, this distils; the result is an HF directory
(config, tokenizer, model.safetensors) that `Engine` loads.

Checkpoints (`checkpoint_every` steps, and at the end) hold the student's weights, the optimizer's
state (safetensors: no pickle) and the position in the data (JSON); `resume=True` continues from
the last one, with the same result as a run that never stopped. `max_seconds` bounds the run.

Default text: Python's pydoc topics (fastllm.eval.default_text) *without* its first
`eval_tokens` tokens, which `fastllm eval perplexity` scores, so training never sees the text
it is evaluated on.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger("fastllm")
CHECKPOINT = "checkpoint"


@dataclass
class DistillResult:
    out_dir: str
    steps: int
    tokens_seen: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # mean loss per logged interval
    stopped: str = "steps"  # "steps" or "time"

    def to_dict(self) -> dict:
        return asdict(self)


def teacher_directory(teacher: str | None, cache_dir: str | None = None) -> Path:
    """An HF directory for `teacher`: itself, or a GGUF file's (the default model's when None)
    converted cache."""
    from .stages.loaders import gguf

    if teacher is None or str(teacher).endswith(".gguf"):
        path = gguf.resolve_gguf(teacher)
        out = gguf.cached_model_dir(path, Path(cache_dir) if cache_dir else None)
        if not (out / "model.safetensors").exists():
            gguf.convert(path, out, progress=False)
        return out
    path = Path(teacher).expanduser()
    if not (path / "config.json").exists():
        raise ConfigError(f"teacher {teacher!r} is neither a GGUF file nor an HF model directory")
    return path


def pick_layers(num_teacher: int, layers) -> list[int]:
    """Teacher layer indices the student keeps: an explicit list, or n spread evenly (first and
    last included)."""
    if isinstance(layers, int):
        if not 1 <= layers <= num_teacher:
            raise ConfigError(f"layers must be in [1, {num_teacher}] (the teacher's), got {layers}")
        if layers == 1:
            return [0]
        return sorted({round(i * (num_teacher - 1) / (layers - 1)) for i in range(layers)})
    idx = list(layers)
    if not idx or any(not isinstance(i, int) or not 0 <= i < num_teacher for i in idx) or len(set(idx)) != len(idx):
        raise ConfigError(f"layers must be distinct teacher layer indices in [0, {num_teacher}), got {layers!r}")
    return idx


def build_student(teacher, layers, intermediate_size: int | None = None):
    """A copy of `teacher` (an HF causal LM) with only `layers` of its decoder layers and, with
    intermediate_size, narrower MLPs (the neurons of largest |gate| * |up| * |down| norm)."""
    import copy

    import torch

    keep = pick_layers(teacher.config.num_hidden_layers, layers)
    student = copy.deepcopy(teacher)
    cfg = student.config  # shared by the student's modules (deepcopy keeps the sharing)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    student.model.layers = torch.nn.ModuleList(student.model.layers[i] for i in keep)
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i
    if intermediate_size is not None:
        full = cfg.intermediate_size
        if not 1 <= intermediate_size <= full:
            raise ConfigError(f"intermediate_size must be in [1, {full}] (the teacher's), got {intermediate_size}")
        for layer in student.model.layers:
            mlp = layer.mlp
            score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
            idx = score.topk(intermediate_size).indices.sort().values
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                old = getattr(mlp, name)
                w = old.weight.detach().index_select(dim, idx)
                new = torch.nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None, dtype=w.dtype)
                new.weight = torch.nn.Parameter(w.clone())
                if old.bias is not None:
                    new.bias = torch.nn.Parameter(old.bias.detach()[idx].clone() if dim == 0 else old.bias.detach().clone())
                setattr(mlp, name, new)
        cfg.intermediate_size = intermediate_size
    student.config.fastllm_distilled_from_layers = keep
    return student


def _token_stream(tokenizer, text_file: str | None, eval_tokens: int) -> list[int]:
    from .eval import default_text

    if text_file is None:
        text, _ = default_text()
        skip = eval_tokens
    else:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the training text {text_file!r}: {e}") from e
        skip = 0
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][skip:]
    return ids


def _save_checkpoint(path: Path, student, optimizer, state: dict) -> None:
    from safetensors.torch import save_file, save_model

    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(student, str(tmp / "student.safetensors"))
    tensors, scalars = {}, {}
    for i, st in optimizer.state_dict()["state"].items():
        for k, v in st.items():
            if hasattr(v, "shape") and v.dim() > 0:
                tensors[f"{i}.{k}"] = v.contiguous()
            else:
                scalars[f"{i}.{k}"] = float(v)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state | {"optimizer_scalars": scalars}, indent=1))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)


def _load_checkpoint(path: Path, student, optimizer) -> dict:
    import torch
    from safetensors.torch import load_file, load_model

    load_model(student, str(path / "student.safetensors"))
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    sd = optimizer.state_dict()
    per: dict[int, dict] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        per.setdefault(int(i), {})[k] = v
    for key, v in state.pop("optimizer_scalars").items():
        i, k = key.split(".", 1)
        per.setdefault(int(i), {})[k] = torch.tensor(v)
    sd["state"] = per
    optimizer.load_state_dict(sd)
    return state


def distill(out_dir: str, teacher: str | None = None, *, layers=6, intermediate_size: int | None = None,
            text_file: str | None = None, eval_tokens: int = 8192, seq_len: int = 256, batch_size: int = 4,
            steps: int = 300, lr: float = 2e-4, warmup_steps: int = 20, temperature: float = 2.0, alpha: float = 0.5,
            checkpoint_every: int = 50, resume: bool = True, max_seconds: float | None = None,
            device: str = "auto", seed: int = 0, progress: bool = True, cache_dir: str | None = None,
            save_initial: bool = True) -> DistillResult:
    """Distil `teacher` (HF directory or GGUF file; default: the embedded SmolLM2) into a student
    of `layers` decoder layers (an int: spread evenly; or teacher indices) saved at `out_dir`
    (and, with save_initial, the student before training at `out_dir/initial`, for comparison).
    See the module docstring for the loss, the data and checkpoints."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name, v, lo in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1), ("steps", steps, 1),
                        ("checkpoint_every", checkpoint_every, 1)):
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
    if not 0 <= alpha <= 1 or temperature <= 0 or lr <= 0:
        raise ConfigError(f"need 0 <= alpha <= 1, temperature > 0 and lr > 0; got {alpha}, {temperature}, {lr}")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    out = Path(out_dir).expanduser()
    ckpt = out / CHECKPOINT
    tdir = teacher_directory(teacher, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tdir))
    dtype = torch.float32  # training in fp32 (bf16 autocast on CUDA)
    teacher_model = AutoModelForCausalLM.from_pretrained(str(tdir), dtype=dtype).to(dev).eval().requires_grad_(False)
    torch.manual_seed(seed)
    student = build_student(teacher_model, layers, intermediate_size).to(dev).train().requires_grad_(True)
    if student.config.tie_word_embeddings:
        student.tie_weights()
    ids = _token_stream(tokenizer, text_file, eval_tokens)
    chunks = len(ids) // (seq_len + 1)
    if chunks < batch_size:
        raise ConfigError(f"the training text has {len(ids)} tokens: fewer than one batch of {batch_size} x "
                          f"{seq_len + 1}; lower seq_len or batch_size, or give a longer text")
    data = torch.tensor(ids[:chunks * (seq_len + 1)]).view(chunks, seq_len + 1)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to zero at `steps`
        return lr * min(1.0, (step + 1) / max(1, warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    state = {"step": 0, "tokens_seen": 0, "losses": [], "seconds": 0.0}
    if resume and (ckpt / "state.json").exists():
        state = _load_checkpoint(ckpt, student, optimizer)
        log.info("resuming distillation at step %d from %s", state["step"], ckpt)
    elif save_initial:
        student.save_pretrained(str(out / "initial"), safe_serialization=True)
        tokenizer.save_pretrained(str(out / "initial"))
    order = list(range(chunks))
    random.Random(seed).shuffle(order)
    t0 = time.perf_counter() - state["seconds"]
    bar = tqdm(total=steps, initial=state["step"], desc="distilling", unit="step", disable=not progress)
    interval: list[float] = []
    stopped = "steps"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    while state["step"] < steps:
        s = state["step"]
        rows = [order[(s * batch_size + i) % chunks] for i in range(batch_size)]  # a fixed order: resumable
        batch = data[rows].to(dev)
        x, y = batch[:, :-1], batch[:, 1:]
        for g in optimizer.param_groups:
            g["lr"] = lr_at(s)
        with autocast:
            with torch.no_grad():
                t_logits = teacher_model(x, use_cache=False).logits.float()
            s_logits = student(x, use_cache=False).logits.float()
        T = temperature
        kl = F.kl_div(F.log_softmax(s_logits / T, -1).flatten(0, 1), F.log_softmax(t_logits / T, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean") * T * T
        ce = F.cross_entropy(s_logits.flatten(0, 1), y.flatten())
        loss = alpha * kl + (1 - alpha) * ce
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        state["step"] += 1
        state["tokens_seen"] += x.numel()
        interval.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = state["step"] >= steps
        over = max_seconds is not None and time.perf_counter() - t0 >= max_seconds
        if state["step"] % checkpoint_every == 0 or done or over:
            state["losses"].append(sum(interval) / len(interval))
            interval = []
            state["seconds"] = time.perf_counter() - t0
            _save_checkpoint(ckpt, student, optimizer, state)
        if over and not done:
            stopped = "time"
            break
    bar.close()
    student.eval()
    student.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / "fastllm_distillation.json").write_text(json.dumps({
        "teacher": str(tdir), "layers": student.config.fastllm_distilled_from_layers,
        "intermediate_size": student.config.intermediate_size, "steps": state["step"], "seq_len": seq_len,
        "batch_size": batch_size, "temperature": temperature, "alpha": alpha, "lr": lr,
        "tokens_seen": state["tokens_seen"], "seconds": state["seconds"], "losses": state["losses"],
        "stopped": stopped}, indent=1))
    return DistillResult(str(out), state["step"], state["tokens_seen"], state["seconds"], state["losses"], stopped)

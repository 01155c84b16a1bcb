"""Weight-only quantizers: model transforms that swap nn.Linear layers for quantized ones."""
from __future__ import annotations

import fnmatch

import torch
from torch import nn


def is_sparse(weight) -> bool:
    """A weight in a sparse layout (a 2:4 semi-structured tensor of the `2:4` pruner)."""
    return weight.layout != torch.strided or type(weight.data).__name__.startswith("SparseSemi")


def linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every plain nn.Linear whose name matches none of `skip`.
    A sparse weight among them is a ConfigError: no quantizer here reads one."""
    from ...errors import ConfigError

    out = []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(child, nn.Linear) or any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(name, p)
                                                       for p in skip):
                continue
            if is_sparse(child.weight):
                raise ConfigError(f"{full} holds a 2:4 sparse weight, which cannot be quantized or pruned again; "
                                  "to combine 2:4 with a quantizer use pruner {'name': '2:4', 'storage': 'masked'}")
            if type(child) is nn.Linear:
                out.append((parent, name, child))
    return out


def norm_fed_linears(model: nn.Module) -> dict[int, nn.Module]:
    """{id(linear): norm} for the linears whose whole input is an RMSNorm's output in a Llama-style
    decoder layer (input_layernorm -> self_attn.qkv_proj, post_attention_layernorm ->
    mlp.gate_up_proj): a per-input-channel scale on such a layer can live in the norm's weight."""
    out = {}
    for layer in getattr(getattr(model, "model", model), "layers", []):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for norm, lin in ((getattr(layer, "input_layernorm", None), getattr(attn, "qkv_proj", None)),
                          (getattr(layer, "post_attention_layernorm", None), getattr(mlp, "gate_up_proj", None))):
            if norm is not None and lin is not None and getattr(norm, "weight", None) is not None:
                out[id(lin)] = norm
    return out


def calibration_ids(ctx, num_tokens: int, path: str | None = None) -> list[int]:
    """Token ids of a calibration text: `path`, or Python's pydoc topics (fastllm.eval.default_text),
    tokenized with the loaded model's tokenizer; its last `num_tokens` (fastllm eval perplexity
    scores a text's first tokens, so calibrating and scoring on the default text never overlap)."""
    from ...errors import ConfigError
    from ...eval import default_text

    if ctx.text_tokenizer is None:
        raise ConfigError("calibrating on text needs the model's tokenizer; this model has none "
                          "(the dummy loader): turn activation-aware calibration off")
    if path is None:
        text, _ = default_text()
    else:
        try:
            text = open(path, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the calibration text {path!r}: {e}") from e
    ids = ctx.text_tokenizer(text, add_special_tokens=False)["input_ids"][-num_tokens:]
    if len(ids) < 16:
        raise ConfigError(f"the calibration text has {len(ids)} tokens; at least 16 are needed")
    return ids


def capture_inputs(model: nn.Module, layers: list[nn.Module], ids: list[int], device, dtype) -> list:
    """Run `model` (fastllm's model interface) once over `ids` and return the input [T, K] (fp32)
    that each of `layers` saw."""
    from ...core.request import Batch, Request
    from ...models.context import ForwardContext
    from ...sampling import SamplingParams
    from ..attention.paged import PagedAttention
    from ..base import KVSpec

    L, H, KVH, D = model.attn_shape
    attention = PagedAttention(kv_cache_memory=2 * L * KVH * D * 4 * (len(ids) + 64) + (1 << 20))
    attention.setup(KVSpec(L, H, KVH, D, dtype, device, D ** -0.5))
    seen: list = [None] * len(layers)

    def keep(i):
        def hook(_module, args):
            seen[i] = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        return hook

    handles = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(layers)]
    try:
        req = Request("calibration", None, list(ids), SamplingParams(max_tokens=1), sink=lambda _: None,
                      max_len=len(ids) + 1)
        attention.allocate(req.id, len(ids))
        batch = Batch([req], [len(ids)])
        with torch.inference_mode():
            model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device),
                  ForwardContext(attention, attention.plan(batch), batch))
    finally:
        for h in handles:
            h.remove()
    return seen


def check_skip(owner: str, skip) -> tuple[str, ...]:
    """A quantizer's `skip` option: a list of module-name patterns, or a ConfigError."""
    from ...errors import ConfigError

    if isinstance(skip, str) or not all(isinstance(p, str) for p in skip):
        raise ConfigError(f"{owner}: skip is a list of module-name patterns, got {skip!r}")
    return tuple(skip)


class RowScaledLinear(nn.Module):
    """A linear layer whose weight is stored as q [N, K] (int8, fp8) times one fp32 scale per
    output row. Subclasses give `quantize(w) -> (q, scale)` and their forward paths."""

    devices = ("cuda",)  # where fastllm's Triton GEMV runs (tests add "cpu": Triton's interpreter)

    @staticmethod
    def quantize(w):
        raise NotImplementedError

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = self.quantize(linear.weight)
        self.register_buffer("qweight", q)  # [N, K]
        self.register_buffer("scale", scale)  # fp32 [N]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantize(self, dtype):
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def _one_token(self, x) -> bool:
        return x.dim() == 2 and x.shape[0] == 1 and x.device.type in self.devices

    def _gemv(self, x, **fused):
        from ...kernels.gemv import gemv

        return gemv(x, self.qweight, self.bias, scale=self.scale, **fused)

    def forward_normed(self, h, residual, norm_weight, eps):
        """As fastllm.core.cuda_linear.DecodeLinear (and under its `fuse_norm` switch, or for int8
        weights where the CUDA GEMV takes the norm: fastllm.kernels.gemv.cuda_norm): the RMSNorm
        before the layer in the GEMV."""
        from ...core.cuda_linear import DecodeLinear
        from ...kernels.gemv import cuda_norm

        if not (self._one_token(h) and (DecodeLinear.fuse_norm or cuda_norm(h, self.qweight))):
            return None
        if residual is None:
            return self._gemv(h, norm_weight=norm_weight, eps=eps), h
        return self._gemv(h, norm_weight=norm_weight, eps=eps, residual=residual)

    def forward_silu_mul(self, gate_up):
        from ...core.cuda_linear import DecodeLinear

        return self._gemv(gate_up, silu_mul=True) if DecodeLinear.fuse_silu_mul and self._one_token(gate_up) else None

    def glu_fits(self, x) -> bool:
        """Whether forward_glu takes x: one token where the CUDA GEMV runs it (fastllm.kernels.gemv.glu_fits)."""
        from ...kernels.gemv import glu_fits

        return self._one_token(x) and glu_fits(x, self.qweight)

    def forward_glu(self, x):
        """silu(gate) * up [1, out_features / 2] of this layer's output for x (gate_up_proj: its gate
        rows, then its up rows) in one kernel; see glu_fits."""
        return self._gemv(x, glu=True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qweight.dtype} per row"

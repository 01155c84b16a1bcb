"""`quantizer="bnb-int8"` and `quantizer="bnb-nf4"`: nn.Linear layers swapped for bitsandbytes'."""
from __future__ import annotations

from torch import nn

from fastllm.errors import ConfigError
from fastllm.stages.base import LoadContext
from fastllm.stages.quantizers import check_skip, linears


def bnb_module():
    """bitsandbytes, or a ConfigError saying how to get it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise ConfigError("the bnb-int8 and bnb-nf4 quantizers need bitsandbytes: pip install bitsandbytes "
                          "(or use fastllm's own quantizer='int8' / 'int4', which need nothing extra)") from e
    return bitsandbytes


class _BnbQuantizer:
    api_version = 1

    def __init__(self, skip: list[str] | tuple[str, ...] = ("lm_head",)):
        self.skip = check_skip(self.name, skip)

    def apply(self, model: nn.Module, ctx: LoadContext) -> nn.Module:
        bnb = bnb_module()
        for parent, name, child in linears(model, self.skip):
            layer = self.make(bnb, child, ctx)
            setattr(parent, name, layer.to(ctx.device))  # bitsandbytes quantizes when moved to the device
        return model


class BnbInt8Quantizer(_BnbQuantizer):
    """LLM.int8: int8 weights, outlier input columns (|x| > threshold) in 16 bits."""

    name = "bnb-int8"

    def __init__(self, threshold: float = 6.0, skip: list[str] | tuple[str, ...] = ("lm_head",)):
        super().__init__(skip)
        self.threshold = float(threshold)

    def make(self, bnb, linear: nn.Linear, ctx: LoadContext) -> nn.Module:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=self.threshold, device="cpu")
        layer.weight = bnb.nn.Int8Params(linear.weight.data.to("cpu"), requires_grad=False, has_fp16_weights=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
        return layer


class BnbNf4Quantizer(_BnbQuantizer):
    """4-bit NormalFloat (or fp4) weights in blocks, computed in the engine's dtype."""

    name = "bnb-nf4"

    def __init__(self, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                 skip: list[str] | tuple[str, ...] = ("lm_head",)):
        super().__init__(skip)
        if quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"bnb-nf4: quant_type is 'nf4' or 'fp4', got {quant_type!r}")
        self.quant_type, self.double_quant, self.blocksize = quant_type, bool(double_quant), int(blocksize)

    def make(self, bnb, linear: nn.Linear, ctx: LoadContext) -> nn.Module:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=ctx.dtype, quant_type=self.quant_type,
                                  compress_statistics=self.double_quant, device="cpu")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.to("cpu"), requires_grad=False,
                                         quant_type=self.quant_type, compress_statistics=self.double_quant,
                                         blocksize=self.blocksize)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
        return layer

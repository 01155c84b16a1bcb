"""fastllm's own model code, one file per family, chosen by the HF config's architecture."""
from __future__ import annotations

from ..errors import UnsupportedModelError

# architecture (or model_type) -> "module:class"
ARCHITECTURES = {
    "LlamaForCausalLM": "llama:LlamaForCausalLM",
    "MistralForCausalLM": "llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "qwen3:Qwen3ForCausalLM",
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def model_class(hf_config) -> type:
    """The fastllm model class for an HF config, or UnsupportedModelError."""
    import importlib

    archs = list(getattr(hf_config, "architectures", None) or [])
    mt = getattr(hf_config, "model_type", None)
    if mt in MODEL_TYPES:
        archs.append(MODEL_TYPES[mt])
    for arch in archs:
        if arch in ARCHITECTURES:
            module, _, cls = ARCHITECTURES[arch].partition(":")
            return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    raise UnsupportedModelError(
        f"no fastllm model code for {archs or mt!r}; supported: {sorted(ARCHITECTURES)}. "
        "loader='transformers' runs any HF causal LM (correct, slower)"
    )

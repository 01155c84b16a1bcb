"""Engine configuration: validated once at the edge, trusted on the hot path."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import registry

DType = Literal["auto", "float32", "bfloat16", "float16"]

DEFAULT_STAGES = {
    "loader": "auto",
    "quantizer": "none",
    "pruner": "none",
    "parallelizer": "single",
    "attention": "auto",
    "batcher": "auto",
    "speculator": "none",
}


class StageSpec(BaseModel):
    """One stage choice: a registered name and that implementation's options."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any) -> "StageSpec":
        """Accept `"int8"`, `{"name": "int4", "group_size": 64}` or a StageSpec."""
        if isinstance(value, StageSpec):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, dict):
            if "name" not in value:
                raise ValueError(f"a stage given as a dict needs a 'name' key, got {sorted(value)}")
            opts = {k: v for k, v in value.items() if k != "name"}
            return cls(name=value["name"], options=opts)
        raise ValueError(f"a stage is a name or a dict with 'name', got {type(value).__name__}")


class EngineConfig(BaseModel):
    """Everything an Engine is built from. Unknown keys are rejected with the valid ones named."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = None
    tokenizer: str | None = None
    dtype: DType = "auto"
    device: str = "auto"
    max_model_len: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)  # None: 1024 on CUDA (graphs cover up to 1024), 16 on the CPU
    max_num_batched_tokens: int | None = Field(None, ge=16)  # None: 16384 on CUDA, 2048 on the CPU
    cuda_graphs: bool = True
    # schedule step N+1 while step N runs (needs a batcher with overlap=True); None: on CUDA
    async_scheduling: bool | None = None
    seed: int = 0
    allow_pickle: bool = False
    cache_dir: str | None = None
    progress: bool = True

    loader: StageSpec = StageSpec(name=DEFAULT_STAGES["loader"])
    quantizer: StageSpec = StageSpec(name=DEFAULT_STAGES["quantizer"])
    pruner: StageSpec = StageSpec(name=DEFAULT_STAGES["pruner"])
    parallelizer: StageSpec = StageSpec(name=DEFAULT_STAGES["parallelizer"])
    attention: StageSpec = StageSpec(name=DEFAULT_STAGES["attention"])
    batcher: StageSpec = StageSpec(name=DEFAULT_STAGES["batcher"])
    speculator: StageSpec = StageSpec(name=DEFAULT_STAGES["speculator"])

    @model_validator(mode="before")
    @classmethod
    def _name_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"unknown engine option(s) {unknown}; valid: {sorted(cls.model_fields)}")
        return data

    @field_validator(*DEFAULT_STAGES, mode="before")
    @classmethod
    def _parse_stage(cls, value: Any, info) -> StageSpec:
        spec = StageSpec.parse(value)
        stage = info.field_name
        valid = registry.names(stage) + (["auto"] if stage in ("loader", "attention", "batcher") else [])
        if spec.name not in valid:
            raise ValueError(f"unknown {stage} {spec.name!r}; valid {stage} names: {valid}")
        return spec

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v == "auto":
            return v
        import torch

        try:
            torch.device(v)
        except RuntimeError as e:
            raise ValueError(f"device {v!r} is not a torch device (try 'cpu', 'cuda', 'cuda:1')") from e
        return v

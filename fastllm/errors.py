"""Typed errors. Each says what was wrong and what would be right."""


class FastLLMError(Exception):
    """Base class of every error fastllm raises on purpose."""


class ConfigError(FastLLMError, ValueError):
    """An engine option is unknown or has an invalid value."""


class InvalidRequestError(FastLLMError, ValueError):
    """One request is invalid (prompt or sampling parameters). The engine keeps serving others."""


class PromptTooLongError(InvalidRequestError):
    """The prompt plus max_tokens does not fit the model's context window."""


class ModelNotFoundError(FastLLMError, FileNotFoundError):
    """The model path, a weight file, or the embedded default model is missing."""


class CheckpointError(FastLLMError):
    """A checkpoint is corrupt, incomplete, or does not match the model's parameters."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint (.bin/.pt) was refused: loading it could execute code."""


class UnsupportedModelError(FastLLMError, ValueError):
    """No fastllm model code for this architecture (the `transformers` loader may run it)."""


class PluginError(FastLLMError):
    """Base class of stage registry errors."""


class UnknownPluginError(PluginError, ValueError):
    """No stage of that name is registered in the group."""


class PluginLoadError(PluginError, ImportError):
    """A registered stage failed to import, or declares an incompatible api_version."""


class DuplicatePluginError(PluginError):
    """Two distributions register the same name in one group."""


class EngineClosedError(FastLLMError, RuntimeError):
    """The engine was closed; build a new one."""


class EngineStepError(FastLLMError, RuntimeError):
    """The model step that served this request failed; the engine goes on serving others."""


def describe_validation_error(e) -> str:
    """A pydantic ValidationError as 'field: message' pairs on one line, without its boilerplate."""
    return "; ".join(f"{'.'.join(map(str, err['loc'])) or 'options'}: {err['msg'].removeprefix('Value error, ')}"
                     for err in e.errors())

"""Per-mode parameters: their defaults, validation, and which ones need a restart (trio-free)."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import InvalidRequest

__all__ = ["SERVER_KEYS", "defaults_for", "validate_update"]

#: Parameters that are llama-server command-line flags: changing one restarts the server.
SERVER_KEYS = frozenset({"context_size", "threads", "gpu_layers", "batch_size"})


def _default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class _Server(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    context_size: int = Field(8192, ge=64, le=1_048_576)
    threads: int = Field(default_factory=_default_threads, ge=1, le=1024)
    gpu_layers: int = Field(0, ge=0, le=10_000)
    batch_size: int = Field(512, ge=1, le=65_536)


class LlmParameters(_Server):
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    repeat_penalty: float = Field(1.1, ge=1.0, le=2.0)
    max_tokens: int = Field(2048, ge=1, le=1_048_576)
    system_prompt: str = ""


class EmbedParameters(_Server):
    normalize: bool = True
    truncate: bool = True


class RerankParameters(_Server):
    pass


_MODELS: dict[str, type[_Server]] = {"llm": LlmParameters, "embed": EmbedParameters, "rerank": RerankParameters}


def defaults_for(mode: str, system_prompt: str) -> dict[str, Any]:
    """The default parameters of `mode` (llm's system prompt comes from configuration)."""
    values = _MODELS[mode]().model_dump()
    if mode == "llm":
        values["system_prompt"] = system_prompt
    return values


def validate_update(mode: str, current: dict[str, Any], changes: object) -> dict[str, Any]:
    """Check a partial update against `mode`'s parameters; return the merged parameters.

    Raises `InvalidRequest` naming every bad or unknown key.
    """
    if not isinstance(changes, dict):
        raise InvalidRequest("body: must be a JSON object of parameters")
    if not changes:
        raise InvalidRequest(f"body: no parameters given; {mode} has {', '.join(current)}")
    try:
        merged = _MODELS[mode].model_validate({**current, **changes})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"])
            if error["type"] == "extra_forbidden":
                problems.append(f"{key}: not a parameter of mode {mode} (valid: {', '.join(current)})")
            else:
                problems.append(f"{key}: {error['msg']}")
        raise InvalidRequest("; ".join(problems)) from None
    return merged.model_dump()

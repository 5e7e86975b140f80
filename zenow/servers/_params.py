"""Per-mode parameters: their defaults, their bounds, validation, and which ones need a restart (trio-free).

Bounds that depend on the machine or the model come in a `Bounds`:

* `threads` is at most the CPU cores zenow may run on;
* `context_size` is at most the context the loaded model was trained for
  (`<arch>.context_length` in its GGUF header), unless the update also carries
  `"allow_context_overflow": true`; with no model loaded (or one that does not
  say) it is at most `CONTEXT_UNKNOWN_MODEL_MAX`.  The override is not a
  parameter: it is remembered with the `context_size` it came with (stored
  under `CONTEXT_OVERFLOW_KEY`, never shown by get_param), and an update of
  `context_size` without it clears it.  When a model is started, a
  `context_size` beyond what it was trained for is lowered to that, unless the
  override is on (`effective_context`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic_core import PydanticCustomError

from ..errors import InvalidRequest
from ..settings import Mode
from ..validation import field_problems

__all__ = [
    "BACKEND_KEYS",
    "CONTEXT_MAX",
    "CONTEXT_OVERFLOW_KEY",
    "CONTEXT_UNKNOWN_MODEL_MAX",
    "KEEP_ALIVE_MAX",
    "MAX_TOKENS_MAX",
    "PARALLEL_MAX",
    "SERVER_KEYS",
    "SYSTEM_PROMPT_MAX",
    "Bounds",
    "ParameterUpdate",
    "context_warning",
    "defaults_for",
    "effective_context",
    "backend_url_checked",
    "restore_stored",
    "validate_update",
]

#: Parameters that are llama-server command-line flags: changing one restarts the server.
SERVER_KEYS = frozenset({"context_size", "threads", "gpu_layers", "batch_size", "rpc_servers", "parallel",
                         "flash_attn"})

#: Parameters that choose a remote backend for the mode instead of a local child (see `_remote`).
BACKEND_KEYS = frozenset({"backend_url", "backend_model"})

#: One llama.cpp RPC worker: `host:port` (an IPv6 address in brackets).
_RPC_WORKER = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([1-9][0-9]{0,4})$"

#: The update key that lets `context_size` go past what the model was trained for.
CONTEXT_OVERFLOW_KEY = "allow_context_overflow"
#: `context_size` never goes beyond this, override or not.
CONTEXT_MAX = 1_048_576
#: ...nor beyond this while no model (or one that does not say its trained context) is loaded.
CONTEXT_UNKNOWN_MODEL_MAX = 131_072
MAX_TOKENS_MAX = 1_048_576
#: `keep_alive` at most (seconds): 30 days; -1 is forever.
KEEP_ALIVE_MAX = 30 * 24 * 3600
#: Parallel slots of the llm server at most.
PARALLEL_MAX = 64
SYSTEM_PROMPT_MAX = 100_000

#: Problems listed in one error message at most (a body may hold thousands of bad keys).
_MAX_PROBLEMS = 10


def backend_url_checked(url: str) -> str:
    """`url` as the root of a remote backend: http or https, a host, no credentials, no query
    or fragment; a trailing `/` or `/v1` is taken off (OpenAI clients' base URLs end in `/v1`,
    zenow appends `/v1/...` itself).  "" (a local child) stays "".  Raises a pydantic error
    that never repeats the URL (it may hold a password)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        raise PydanticCustomError("backend_url", "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PydanticCustomError("backend_url", "must be an http:// or https:// URL with a host, "
                                                 "such as http://10.0.0.5:8080 (or \"\" to serve the mode locally)")
    if "@" in parts.netloc:
        raise PydanticCustomError("backend_url", "must not hold credentials (user:password@): "
                                                 "give the backend's key in backend_api_key")
    if parts.query or parts.fragment or any(c.isspace() for c in url):
        raise PydanticCustomError("backend_url", "must have no query, fragment or spaces")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/v1").rstrip("/")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}{f':{port}' if port is not None else ''}{path}"


class _Server(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    context_size: int = Field(8192, ge=64, le=CONTEXT_MAX)
    threads: int = Field(4, ge=1, le=1024)
    gpu_layers: int = Field(0, ge=0, le=10_000)
    batch_size: int = Field(512, ge=1, le=65_536)
    #: llama.cpp RPC workers (`zenow worker` on other machines) that take part of the model's layers.
    rpc_servers: list[Annotated[str, StringConstraints(pattern=_RPC_WORKER)]] = Field(
        default_factory=list, max_length=16)
    #: llama-server's flash attention (`-fa`), passed as it is; "auto" lets llama-server choose (on
    #: where the device supports it, the CPU included).  On the CPU, "off" starts a turn deep in a
    #: conversation sooner but generates about 10 % slower at every depth (bench/RESULTS.md); embed
    #: and rerank vectors are only identical from request to request with it on.
    flash_attn: Literal["auto", "on", "off"] = "auto"
    #: Seconds without a request before the server is stopped (status `stopped`, reason `idle`;
    #: the next request starts it again); -1 never.  Not a server flag: a change restarts nothing.
    keep_alive: int = Field(-1, ge=-1, le=KEEP_ALIVE_MAX)
    #: An OpenAI-compatible server that serves this mode instead of a local llama-server ("": local).
    backend_url: Annotated[str, AfterValidator(backend_url_checked)] = Field("", max_length=2048)
    #: The model name sent to that backend ("": the first one it lists at /v1/models).
    backend_model: str = Field("", max_length=200)


class LlmParameters(_Server):
    #: Conversations the llm server generates for at once (llama-server's slots, `-np`), with
    #: continuous batching; each slot holds `context_size` tokens, so the KV cache takes
    #: `context_size * parallel` tokens in all.
    parallel: int = Field(4, ge=1, le=PARALLEL_MAX)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    repeat_penalty: float = Field(1.1, ge=1.0, le=2.0)
    max_tokens: int = Field(2048, ge=1, le=MAX_TOKENS_MAX)
    system_prompt: str = Field("", max_length=SYSTEM_PROMPT_MAX)


class EmbedParameters(_Server):
    normalize: bool = True
    truncate: bool = True


class RerankParameters(_Server):
    pass


_MODELS: dict[Mode, type[_Server]] = {"llm": LlmParameters, "embed": EmbedParameters, "rerank": RerankParameters}


@dataclass(frozen=True, slots=True)
class Bounds:
    """What the machine and the loaded model allow."""

    #: CPU cores zenow may run on.
    cores: int
    #: The loaded model's name and trained context, when a model is loaded and its header says.
    model_name: str | None = None
    trained_context: int | None = None


@dataclass(frozen=True, slots=True)
class ParameterUpdate:
    """A checked update."""

    #: Every parameter of the mode after the update.
    parameters: dict[str, Any]
    #: What to store: the keys the update set, plus `CONTEXT_OVERFLOW_KEY` when it set `context_size`.
    stored: dict[str, Any]
    #: Whether `context_size` may exceed the model's trained context from now on.
    context_overflow: bool


def defaults_for(mode: Mode, system_prompt: str, cores: int) -> dict[str, Any]:
    """The default parameters of `mode` (llm's system prompt comes from configuration;
    threads default to the cores available, at most 8)."""
    values = _MODELS[mode].model_validate({}).model_dump()
    values["threads"] = max(1, min(8, cores))
    if mode == "llm":
        values["system_prompt"] = system_prompt
    return values


def validate_update(mode: Mode, current: dict[str, Any], changes: object, bounds: Bounds,
                    context_overflow: bool) -> ParameterUpdate:
    """Check a partial update against `mode`'s parameters and `bounds`.

    `context_overflow` is whether the current `context_size` was set with the override.
    Raises `InvalidRequest` naming every bad or unknown key; then nothing changed.
    """
    if not isinstance(changes, dict):
        raise InvalidRequest("body: must be a JSON object of parameters")
    changes = dict(changes)
    overflow_given = changes.pop(CONTEXT_OVERFLOW_KEY, None)
    if not changes:
        raise InvalidRequest(f"body: no parameters given; {mode} has {', '.join(current)}")
    problems = _unicode_problems(changes)
    if problems:
        raise InvalidRequest("; ".join(problems[:_MAX_PROBLEMS]))
    if overflow_given is not None and not isinstance(overflow_given, bool):
        problems.append(f"{CONTEXT_OVERFLOW_KEY}: must be true or false")
    elif overflow_given is not None and "context_size" not in changes:
        problems.append(f"{CONTEXT_OVERFLOW_KEY}: only applies together with context_size")
    try:
        merged = _MODELS[mode].model_validate({**current, **changes}).model_dump()
    except ValidationError as exc:
        problems += _problems(exc, mode, current)
        merged = None
    if merged is not None:
        overflow = bool(overflow_given) if "context_size" in changes else context_overflow
        problems += _bound_problems(merged, changes, bounds, overflow)
    if problems:
        shown = problems[:_MAX_PROBLEMS]
        if len(problems) > _MAX_PROBLEMS:
            shown.append(f"and {len(problems) - _MAX_PROBLEMS} more")
        raise InvalidRequest("; ".join(shown))
    assert merged is not None
    stored = {k: merged[k] for k in changes}
    if "context_size" in changes:
        stored[CONTEXT_OVERFLOW_KEY] = overflow
    return ParameterUpdate(merged, stored, overflow)


def restore_stored(mode: Mode, defaults: dict[str, Any], stored: dict[str, Any],
                   bounds: Bounds) -> tuple[dict[str, Any], bool, list[str]]:
    """The parameters to run with, from what the store holds (it may hold anything: values
    written by an older zenow, or by hand).

    Returns (parameters, context_overflow, problems): a stored value that is not valid now
    is replaced by its default and described in `problems`; unknown keys are ignored.
    Never raises.
    """
    overflow = stored.get(CONTEXT_OVERFLOW_KEY, False)
    problems: list[str] = []
    if not isinstance(overflow, bool):
        problems.append(f"{CONTEXT_OVERFLOW_KEY}: stored value {_shown(overflow)} is not true or false")
        overflow = False
    parameters = dict(defaults)
    for key in defaults:
        if key not in stored:
            continue
        change = {key: stored[key]}
        if key == "context_size":
            change[CONTEXT_OVERFLOW_KEY] = overflow
        try:
            update = validate_update(mode, parameters, change, bounds, overflow)
        except InvalidRequest as exc:
            problems.append(f"stored value {_shown(stored[key])} is refused ({exc}); using {_shown(defaults[key])}")
            continue
        parameters = update.parameters
    return parameters, overflow, problems


def effective_context(context_size: int, trained_context: int | None, context_overflow: bool) -> int:
    """The context to start a model with: `context_size`, lowered to what the model was trained for
    unless the override is on."""
    if trained_context is None or context_overflow:
        return context_size
    return min(context_size, trained_context)


def context_warning(model_name: str, context_size: int, trained_context: int | None,
                    context_overflow: bool) -> str | None:
    """What a load or parameter answer says when `context_size` is more than the model was trained
    for; None when it is not (or the model does not say)."""
    if trained_context is None or context_size <= trained_context:
        return None
    if context_overflow:
        return (f"context_size {context_size} is more than the {trained_context} tokens {model_name} was trained "
                f"for ({CONTEXT_OVERFLOW_KEY}): it runs with {context_size}, and answers past {trained_context} "
                "tokens may lose coherence")
    return (f"{model_name} was trained for {trained_context} tokens: it runs with a context of {trained_context}, "
            f"not the context_size {context_size} (set {CONTEXT_OVERFLOW_KEY} with context_size to go beyond)")


def _bound_problems(merged: dict[str, Any], changes: dict[str, Any], bounds: Bounds, overflow: bool) -> list[str]:
    problems = []
    if "threads" in changes and merged["threads"] > bounds.cores:
        problems.append(f"threads: {merged['threads']} is more than the {bounds.cores} CPU cores available")
    if "context_size" in changes and not overflow:
        context = merged["context_size"]
        if bounds.trained_context is not None:
            if context > bounds.trained_context:
                problems.append(
                    f"context_size: {context} is more than the {bounds.trained_context} tokens "
                    f"{bounds.model_name or 'the loaded model'} was trained for; add "
                    f'"{CONTEXT_OVERFLOW_KEY}": true to the update to use it anyway'
                )
        elif context > CONTEXT_UNKNOWN_MODEL_MAX:
            problems.append(
                f"context_size: {context} is more than {CONTEXT_UNKNOWN_MODEL_MAX}, the most allowed while no "
                f'model that states its trained context is loaded; add "{CONTEXT_OVERFLOW_KEY}": true to the '
                "update to use it anyway"
            )
    return problems


def _unicode_problems(changes: dict[str, Any]) -> list[str]:
    """JSON can carry a lone surrogate ("\\ud800") in a key or a string; nothing downstream can
    (SQLite, llama-server, the JSON answers), so such text is refused up front."""
    problems = []
    for key, value in changes.items():
        if not _is_unicode(key):
            problems.append(f"{_shown_key(key)}: a parameter name must be valid Unicode text")
        elif isinstance(value, str) and not _is_unicode(value):
            problems.append(f"{key}: must be valid Unicode text (it holds a lone surrogate)")
    return problems


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _problems(exc: ValidationError, mode: Mode, current: dict[str, Any]) -> list[str]:
    unknown = f"not a parameter of mode {mode} (valid: {', '.join(current)})"
    problems = field_problems(exc, message=lambda error: unknown if error["type"] == "extra_forbidden" else None)
    return [f"{_shown_key(key)}: {'; '.join(messages)}" for key, messages in problems.items()]


def _shown_key(part: object) -> str:
    """A key as it can be shown in a message: valid Unicode, at most 64 characters."""
    text = str(part).encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 64 else text[:61] + "..."


def _shown(value: object) -> str:
    """A (stored) value as it can be shown in a log line: ASCII, at most 80 characters."""
    text = ascii(value)
    return text if len(text) <= 80 else text[:77] + "..."

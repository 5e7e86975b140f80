"""The HTTP shapes of `/api`: what each route answers, as the spec shows it.

The pydantic models document the routes in `/openapi.json` (what front-end authors and
the fuzzer read); the functions turn the actors' records into those shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from quart_schema import document_querystring, document_request, document_response

from ..events import status_state
from ..servers import ServerStatus
from ..store import MessageInfo, ModelDetails, ModelInfo, SessionInfo

F = TypeVar("F", bound=Callable[..., Any])

#: Every route may answer these with `{"detail": ...}`: bad input, a missing or wrong key, a
#: foreign Host, a body too large or not JSON, a failure, an actor that is down.
COMMON_ERRORS = (400, 401, 403, 413, 415, 500, 503)


class Detail(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["healthy", "degraded"]
    app: Literal["zenow"]
    version: str | None = None
    #: The actors that crashed too often and stay down, with why (only when degraded).
    down: dict[str, str] | None = None


class ModeQuery(BaseModel):
    mode: Literal["llm", "embed", "rerank"] = "llm"


class OptionalModeQuery(BaseModel):
    mode: Literal["llm", "embed", "rerank"] | None = None


class Done(BaseModel):
    success: bool
    message: str


class CreatedSession(BaseModel):
    session_id: int
    session_name: str


#: A session as the spec shows it: the store's record, field for field.
Session = SessionInfo


class SessionList(BaseModel):
    sessions: list[Session]
    total: int


#: A message as the spec shows it: the store's record, field for field.
Message = MessageInfo


class MessageList(BaseModel):
    messages: list[Message]
    session_id: int
    total_tokens: int


class AddedMessage(BaseModel):
    message_id: int
    token_count: int


class ModelDetailsShape(BaseModel):
    """What the model file's GGUF header says (null where it does not say), read at registration."""

    architecture: str | None
    name: str | None
    parameter_count: int
    #: The parameter count to three digits: "135M", "1.54B".
    parameter_size: str
    #: `general.file_type` and its name, the quantisation ("Q4_K_M", "F16").
    file_type: int | None
    quantization: str | None
    #: The context the model was trained for, in tokens.
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    has_chat_template: bool
    pooling: str | None
    #: The modes the header says the model can serve.
    modes: list[Literal["llm", "embed", "rerank"]]
    gguf_version: int
    #: Bytes on disk.
    file_size: int


class Model(BaseModel):
    id: int
    name: str
    path: str
    is_downloaded: bool
    mode: Literal["llm", "embed", "rerank"]
    #: null for a model registered before zenow read headers (filled in at its next registration).
    details: ModelDetailsShape | None = None


class ModelInfoQuery(BaseModel):
    model_name: str = Field(min_length=1)
    mode: Literal["llm", "embed", "rerank"] = "llm"


class ModelList(BaseModel):
    models: list[Model]
    current_model: Model | None


class Loaded(BaseModel):
    success: bool
    message: str
    model_name: str | None
    model_path: str | None
    server_status: str
    #: When `context_size` is more than the model was trained for (it then runs with less, unless
    #: `allow_context_overflow` was set).
    warning: str | None = None


class LoadFailed(BaseModel):
    detail: str
    success: Literal[False]
    message: str


class ServerStatusShape(BaseModel):
    status: Literal["not_started", "starting", "running", "error", "stopped"]
    model_name: str | None
    model_path: str | None
    is_running: bool
    error_message: str | None
    #: Only when the server is `stopped`, why: "idle" (no request for `keep_alive` seconds; the
    #: next one starts it again) or "shutdown".
    reason: str | None = None
    #: Only for a mode served by a remote backend: its URL, and whether token counts come from
    #: its `/tokenize` or are zenow's estimate.
    backend_url: str | None = None
    token_counting: Literal["tokenize", "estimate"] | None = None


class Parameters(BaseModel):
    """A mode's parameters: these four for every mode, plus the mode's own (see the spec, section 1.7)."""

    model_config = ConfigDict(extra="allow")
    context_size: int
    threads: int
    gpu_layers: int
    batch_size: int
    #: The remote backend serving the mode ("": a local llama-server), the model name sent to it
    #: ("": the first it lists), and whether its key is set (the key itself is never answered).
    backend_url: str
    backend_model: str
    backend_api_key_set: bool


class ParameterUpdate(BaseModel):
    """Any non-empty subset of the mode's parameters (unknown keys are a 400 naming them)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"minProperties": 1})
    context_size: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    batch_size: int | None = None
    backend_url: str | None = None
    backend_model: str | None = None
    #: Write-only: the remote backend's key ("" or null clears it).
    backend_api_key: str | None = None


class Updated(BaseModel):
    success: bool
    message: str
    requires_restart: bool
    #: When `context_size` is more than the loaded model was trained for.
    warning: str | None = None


class ChatReply(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    message: ChatReply
    finish_reason: str | None


class ChatAnswer(BaseModel):
    """`stream: false`; with `stream: true` the answer is `text/event-stream` (spec section 3)."""

    choices: list[ChatChoice] = Field(min_length=1)
    usage: dict[str, Any]
    session_id: int


class DownloadShape(BaseModel):
    url: str
    filename: str
    status: Literal["downloading", "completed", "failed"]
    downloaded: int
    total: int | None
    progress: float
    error: str | None


class DownloadStarted(BaseModel):
    success: bool
    url: str
    mode: Literal["llm", "embed", "rerank"]
    message: str


class DownloadStatusAnswer(BaseModel):
    """`downloads` without `url` in the query string, `download` with it."""

    success: bool
    downloads: list[DownloadShape] | None = None
    download: DownloadShape | None = None


class DownloadStopped(BaseModel):
    success: bool
    message: str
    download: DownloadShape
    discarded: bool | None = None


class DefaultUrls(BaseModel):
    urls: dict[str, list[str]]
    browser_path: str


def documented(answer: type[Any] | None, *errors: int, query: type[BaseModel] | None = None,
               body: type[BaseModel] | None = None) -> Callable[[F], F]:
    """Document a route in `/openapi.json`: its 200 answer, its query string or body when the
    route reads them itself, and its error answers (`COMMON_ERRORS` plus `errors`)."""

    def document(route: F) -> F:
        if answer is not None:
            route = document_response(answer, 200)(route)
        for status in sorted({*COMMON_ERRORS, *errors}):
            route = document_response(Detail, status)(route)
        if query is not None:
            route = document_querystring(query)(route)
        if body is not None:
            route = document_request(body)(route)
        return route

    return document


def session_json(session: SessionInfo) -> dict[str, Any]:
    # field by field: `dataclasses.asdict` deep-copies every value, most of a page's cost
    return {"id": session.id, "session_name": session.session_name, "created_at": session.created_at,
            "updated_at": session.updated_at, "message_count": session.message_count,
            "total_tokens": session.total_tokens}


def message_json(message: MessageInfo) -> dict[str, Any]:
    return {"id": message.id, "session_id": message.session_id, "role": message.role, "content": message.content,
            "token_count": message.token_count, "created_at": message.created_at}


def model_json(model: ModelInfo | None) -> dict[str, Any] | None:
    """A model as the spec shows it, plus `details`."""
    if model is None:
        return None
    return {"id": model.id, "name": model.name, "path": model.path,
            "is_downloaded": model.is_downloaded, "mode": model.mode, "details": details_json(model.details)}


def details_json(details: ModelDetails | None) -> dict[str, Any] | None:
    if details is None:
        return None
    shown = asdict(details)
    shown["modes"] = list(details.modes)
    return {"architecture": shown.pop("architecture"), "name": shown.pop("name"),
            "parameter_count": shown.pop("parameter_count"), "parameter_size": details.parameter_size, **shown}


def server_status_json(status: ServerStatus) -> dict[str, Any]:
    """A mode's status as the spec shows it (section 4); see `zenow.events.status_state`."""
    return status_state(status)

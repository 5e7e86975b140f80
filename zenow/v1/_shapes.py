"""OpenAI-shaped requests and answers for `/v1`, and nothing else: no trio, no I/O.

Each `parse_*` takes a decoded JSON body and returns a typed request, or raises
`InvalidRequest` with `param` naming the first bad field.  Each `*_response` turns
what llama-server answered into what an OpenAI (or Jina/Cohere) client reads.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from uuid import uuid4

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ..errors import InvalidRequest, UpstreamError, ZenowError
from ..event_stream import JSON_STRING as _STRING
from ..validation import invalid_request

__all__ = [
    "DONE",
    "MAX_DOCUMENTS",
    "MAX_INPUTS",
    "MAX_TOKENS_LIMIT",
    "ChatCompletionBody",
    "ChatCompletionRequest",
    "ChatMessage",
    "EmbeddingsBody",
    "EmbeddingsRequest",
    "EncodingFormat",
    "ModelEntry",
    "RerankBody",
    "RerankDocument",
    "RerankRequest",
    "StreamOptions",
    "chat_chunk",
    "chat_completion_response",
    "embeddings_response",
    "error_event",
    "float32_base64",
    "model_object",
    "parse_chat_completion",
    "parse_embeddings",
    "parse_rerank",
    "rerank_response",
    "sse",
    "truncated_tokens",
    "upstream_chat_payload",
    "upstream_failure",
]

#: No reply needs more tokens than the largest context window llama.cpp supports.
MAX_TOKENS_LIMIT = 1_048_576
#: OpenAI's own limit on the inputs of one embeddings request.
MAX_INPUTS = 2048
#: Documents one rerank request may score (each is one llama-server task).
MAX_DOCUMENTS = 10_000
MAX_MODEL_NAME = 200

DONE = b"data: [DONE]\n\n"

EncodingFormat = Literal["float", "base64"]


# ---------------------------------------------------------------- validation


def _object(body: object) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("body: must be a JSON object", param=None)
    return body


def _integral(value: object) -> object:
    """JSON has one number type: 5.0 is the integer 5 (JSON Schema agrees), 5.5 is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_AS_INTEGER = BeforeValidator(_integral)
#: Integer fields take 5.0 as 5, but never "5" or true (the validator comes last so that the
#: bounds still show in the JSON schema as minimum and maximum).
_Int = Annotated[int, _AS_INTEGER]
_TokenLimit = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), _AS_INTEGER]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool = False


class ChatMessage(BaseModel):
    """A message as llama-server's chat templates read it (tool calls and parts pass through)."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: str = Field(min_length=1, max_length=64)
    content: str | list[Any] | None = None


class ChatCompletionBody(BaseModel):
    """The fields zenow checks; every other field passes through to llama-server."""

    model_config = ConfigDict(strict=True, extra="allow")
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_NAME)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: _TokenLimit | None = None
    max_completion_tokens: _TokenLimit | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repeat_penalty: float | None = Field(None, ge=0.0, le=10.0)
    seed: _Int | None = None
    n: Annotated[int, Field(ge=1, le=1), _AS_INTEGER] | None = None
    stop: str | list[str] | None = None


@dataclass(frozen=True)
class ChatCompletionRequest:
    """A checked `/v1/chat/completions` request.

    `options` is the body as llama-server gets it (messages and every sampling field the
    client gave), without `model`, `stream`, `stream_options`, and with one `max_tokens`.
    """

    model: str | None
    stream: bool
    include_usage: bool
    options: dict[str, Any] = field(default_factory=dict)


def parse_chat_completion(body: object) -> ChatCompletionRequest:
    """Check a chat completion body.  Raises `InvalidRequest` naming the field (`param`)."""
    values = _object(body)
    try:
        chat = ChatCompletionBody.model_validate(values)
    except ValidationError as exc:
        raise invalid_request(exc) from None
    given = {k: v for k, v in values.items() if v is not None}
    options = {k: v for k, v in given.items() if k not in ("model", "stream", "stream_options",
                                                            "max_completion_tokens")}
    for key in ("seed", "n"):  # as validated: 5.0 goes on as 5
        if key in options:
            options[key] = getattr(chat, key)
    # OpenAI's newer name wins where both are given; llama-server gets one limit.
    limit = chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens
    if limit is not None:
        options["max_tokens"] = limit
    include_usage = chat.stream_options.include_usage if chat.stream_options is not None else False
    return ChatCompletionRequest(chat.model, chat.stream, include_usage, options)


def upstream_chat_payload(request: ChatCompletionRequest, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """What llama-server gets: the request's options over the llm parameters in `defaults`
    (`temperature`, `repeat_penalty`, `max_tokens`), streamed or not."""
    payload = {key: defaults[key] for key in ("temperature", "repeat_penalty", "max_tokens") if key in defaults}
    payload.update(request.options)
    payload["stream"] = request.stream
    if request.stream:
        payload["stream_options"] = {"include_usage": request.include_usage}
    return payload


_Text = Annotated[str, Field(min_length=1)]
_Tokens = Annotated[list[Annotated[int, Field(ge=0), _AS_INTEGER]], Field(min_length=1)]


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    input: (_Text | Annotated[list[_Text], Field(min_length=1, max_length=MAX_INPUTS)] | _Tokens
            | Annotated[list[_Tokens], Field(min_length=1, max_length=MAX_INPUTS)])
    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_NAME)
    encoding_format: EncodingFormat = "float"


@dataclass(frozen=True)
class EmbeddingsRequest:
    """A checked `/v1/embeddings` request: each input a text or a list of token ids."""

    model: str | None
    inputs: list[str | list[int]]
    encoding_format: EncodingFormat


def parse_embeddings(body: object) -> EmbeddingsRequest:
    """Check an embeddings body.  Raises `InvalidRequest` naming the field (`param`)."""
    values = _object(body)
    if values.get("dimensions") is not None:
        raise InvalidRequest("dimensions: not supported; a model's vectors have the width it was trained with",
                             param="dimensions")
    try:
        parsed = EmbeddingsBody.model_validate(values)
    except ValidationError as exc:
        error = invalid_request(exc)
        if error.param and error.param.startswith("input"):
            raise InvalidRequest(
                f"input: must be a non-empty string, a list of 1 to {MAX_INPUTS} non-empty strings, a non-empty "
                f"list of token ids (0 or more), or a list of 1 to {MAX_INPUTS} such lists", param="input",
            ) from None
        raise error from None
    raw = parsed.input
    inputs: list[str | list[int]]
    if isinstance(raw, str):
        inputs = [raw]
    elif all(isinstance(item, int) for item in raw):
        inputs = [[item for item in raw if isinstance(item, int)]]  # one token array
    else:
        inputs = [item for item in raw if isinstance(item, str | list)]
    return EmbeddingsRequest(parsed.model, inputs, parsed.encoding_format)


class RerankDocument(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    text: str


class RerankBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    query: str = Field(min_length=1)
    documents: list[str | RerankDocument] = Field(min_length=1, max_length=MAX_DOCUMENTS)
    model: str | None = Field(None, min_length=1, max_length=MAX_MODEL_NAME)
    top_n: Annotated[int, Field(ge=1), _AS_INTEGER] | None = None
    return_documents: bool = False


@dataclass(frozen=True)
class RerankRequest:
    """A checked `/v1/rerank` request (Cohere-style `{"text": ...}` documents read as their text)."""

    model: str | None
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool


def parse_rerank(body: object) -> RerankRequest:
    """Check a rerank body.  Raises `InvalidRequest` naming the field (`param`); empty
    `documents` is one of those."""
    values = _object(body)
    try:
        parsed = RerankBody.model_validate(values)
    except ValidationError as exc:
        error = invalid_request(exc)
        if error.param and error.param.startswith("documents."):
            index = error.param.split(".")[1]
            raise InvalidRequest(f"documents.{index}: must be a string or an object with a string `text`",
                                 param="documents") from None
        raise error from None
    documents = [doc if isinstance(doc, str) else doc.text for doc in parsed.documents]
    return RerankRequest(parsed.model, parsed.query, documents, parsed.top_n, parsed.return_documents)


# ---------------------------------------------------------------- answers


@dataclass(frozen=True)
class ModelEntry:
    """One registered, downloaded model as `/v1/models` lists it."""

    name: str
    mode: str
    created: int
    running: bool


def model_object(entry: ModelEntry) -> dict[str, Any]:
    """OpenAI's model object, plus zenow's `mode` and `running`."""
    return {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "zenow",
            "mode": entry.mode, "running": entry.running}


def chat_completion_response(upstream: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """llama-server's chat completion with zenow's model name (llama-server gives its file path)."""
    return {**upstream, "model": model_name}


def chat_chunk(upstream: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """One streamed chunk with zenow's model name."""
    return {**upstream, "model": model_name}


#: llama-server's usual streamed chunk: one content delta and its fixed fields, in the order it
#: writes them.  Its `model` (the file's path) is replaced on the bytes, with no JSON decoding and
#: encoding per token; any other chunk (the role, the end, usage, an error, another build's
#: shape) does not match and is decoded.
_CONTENT_CHUNK = re.compile(
    rb'(\{"choices":\[\{"finish_reason":null,"index":0,"delta":\{"content":)(' + _STRING
    + rb')(\}\}\],"created":\d+,"id":' + _STRING + rb',"model":)' + _STRING
    + rb'(,"system_fingerprint":' + _STRING + rb',"object":"chat\.completion\.chunk"\})',
    re.DOTALL,
)


def content_chunk_event(data: bytes, model_literal: bytes) -> tuple[bytes, bytes] | None:
    """The event for `data` (a `data:` payload) when it is llama-server's usual content chunk, its
    model replaced by `model_literal` (zenow's model name as a JSON string), and the chunk's content
    as a JSON string body (escaped, unquoted: see `decode_literal`); None for any other chunk."""
    match = _CONTENT_CHUNK.fullmatch(data)
    if match is None:
        return None
    head, content, middle, tail = match.groups()
    return b"data: " + head + content + middle + model_literal + tail + b"\n\n", content[1:-1]


def sse(payload: Mapping[str, Any]) -> bytes:
    """One whole SSE event (`data: {json}` and its blank line)."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def error_event(message: str, code: str = "upstream_error") -> bytes:
    """The event that ends a failed stream (before `DONE`), in OpenAI's error shape."""
    return sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})


def float32_base64(values: Sequence[float]) -> str:
    """A vector as OpenAI's base64 encoding sends it: little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def embeddings_response(upstream: Mapping[str, Any], model_name: str, encoding_format: EncodingFormat,
                        count: int) -> dict[str, Any]:
    """OpenAI's embeddings answer from llama-server's (asked for floats), in input order.

    Raises `UpstreamError` when llama-server's answer is not the expected shape.
    """
    try:
        rows = sorted(upstream["data"], key=lambda row: int(row["index"]))
        vectors = [[float(x) for x in row["embedding"]] for row in rows]
        usage = upstream.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(f"llama-server answered embeddings in an unexpected shape: {exc!r}") from exc
    if len(vectors) != count:
        raise UpstreamError(f"llama-server answered {len(vectors)} embeddings for {count} inputs")
    data: list[dict[str, Any]] = [
        {"object": "embedding", "index": index,
         "embedding": float32_base64(vector) if encoding_format == "base64" else vector}
        for index, vector in enumerate(vectors)
    ]
    return {"object": "list", "data": data, "model": model_name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def rerank_response(upstream: Mapping[str, Any], request: RerankRequest, model_name: str) -> dict[str, Any]:
    """The rerank answer Jina and Cohere clients read: results best first, cut to `top_n`.

    Raises `UpstreamError` when llama-server's answer is not the expected shape.
    """
    try:
        scored = [(int(r["index"]), float(r["relevance_score"])) for r in upstream["results"]]
        usage = upstream.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens", usage.get("total_tokens", 0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise UpstreamError(f"llama-server answered rerank in an unexpected shape: {exc!r}") from exc
    if sorted(index for index, _ in scored) != list(range(len(request.documents))):
        raise UpstreamError(f"llama-server scored {len(scored)} documents for {len(request.documents)}")
    scored.sort(key=lambda pair: (-pair[1], pair[0]))
    if request.top_n is not None:
        scored = scored[: request.top_n]
    results: list[dict[str, Any]] = []
    for index, score in scored:
        result: dict[str, Any] = {"index": index, "relevance_score": score}
        if request.return_documents:
            result["document"] = {"text": request.documents[index]}
        results.append(result)
    return {"id": f"rerank-{uuid4().hex}", "object": "list", "model": model_name, "results": results,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


# ---------------------------------------------------------------- llama-server's side


def truncated_tokens(full: Sequence[int], plain: Sequence[int], limit: int) -> list[int]:
    """`full` (a text tokenized with its special tokens) cut to `limit` tokens, keeping the
    special tokens around the text (`plain` is the same text without them): the text's
    tail goes, [CLS]/[SEP] or BOS/EOS stay."""
    if len(full) <= limit:
        return list(full)
    extra = len(full) - len(plain)
    if 0 <= extra < limit:
        for start in range(extra + 1):
            if list(full[start:start + len(plain)]) == list(plain):
                prefix, suffix = full[:start], full[start + len(plain):]
                return [*prefix, *plain[: limit - extra], *suffix]
    return list(full[:limit])


_TOO_LONG = ("too large to process", "exceeds the available context size", "exceed_context_size")


def upstream_failure(status: int, body: str, param: str | None) -> ZenowError:
    """The error for a llama-server answer with HTTP `status` and `body`.

    Input that is too long for the model is the client's: `InvalidRequest` (400, code
    `context_length_exceeded`, naming `param`); any other 4xx is the client's too (400);
    everything else is `UpstreamError` (502).
    """
    message = body.strip()[:500]
    kind = ""
    try:
        parsed = json.loads(body)
        error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
        if isinstance(error, dict):
            message = str(error.get("message", message))
            kind = str(error.get("type", ""))
    except ValueError:
        pass
    text = f"{message} {kind}".lower()
    if any(marker in text for marker in _TOO_LONG):
        return InvalidRequest(f"{param or 'input'}: too long for the model: {message}", param=param,
                              code="context_length_exceeded")
    if 400 <= status < 500:
        return InvalidRequest(f"llama-server refused the request: {message}", param=None)
    return UpstreamError(f"llama-server answered {status}: {message}", code="upstream_error")

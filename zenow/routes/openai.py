"""OpenAI-compatible `/v1`: chat completions, embeddings, rerank, models.

Errors here are OpenAI's `{"error": {"message", "type", "param", "code"}}` (the app
renders every `ZenowError` raised on a `/v1` path that way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel
from quart import Blueprint, Response, request
from quart_schema import document_querystring, document_request, document_response

from ..errors import InvalidMode
from ..settings import is_mode
from ..v1 import (
    ChatCompletionBody,
    EmbeddingsBody,
    OpenAIGateway,
    RerankBody,
    model_object,
    parse_chat_completion,
    parse_embeddings,
    parse_rerank,
)
from ._context import services
from ._sse import sse_response

bp = Blueprint("openai", __name__)

F = TypeVar("F", bound=Callable[..., Any])


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    error: ErrorObject


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    mode: Literal["llm", "embed", "rerank"]
    running: bool


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class ModelQuery(BaseModel):
    mode: Literal["llm", "embed", "rerank"] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankList(BaseModel):
    id: str
    object: Literal["list"]
    model: str
    results: list[RerankResult]
    usage: Usage


#: What any `/v1` route may answer besides 200 (415: a body that is not JSON).
_ERRORS = (400, 401, 403, 413, 415, 500, 503)


def _documented(answer: type[BaseModel] | None, *errors: int, body: type[BaseModel] | None = None
                ) -> Callable[[F], F]:
    """Document a route in `/openapi.json`: its 200 answer, its body (which the route reads
    itself, with the same model), and its errors in OpenAI's shape."""

    def document(route: F) -> F:
        if body is not None:
            route = document_request(body)(route)
        if answer is not None:
            route = document_response(answer, 200)(route)
        for status in sorted({*_ERRORS, *errors}):
            route = document_response(OpenAIError, status)(route)
        return route

    return document


def _gateway() -> OpenAIGateway:
    return services().openai


@bp.get("/v1/models")
@_documented(ModelList)
async def list_models() -> dict[str, Any]:
    return {"object": "list", "data": [model_object(entry) for entry in await _gateway().models()]}


@bp.get("/v1/models/<model_id>")
@document_querystring(ModelQuery)
@_documented(Model, 404)
async def get_model(model_id: str) -> dict[str, Any]:
    """A model by name; `?mode=` picks among modes that share the name (else llm, embed, rerank)."""
    mode = request.args.get("mode")
    if mode is not None and not is_mode(mode):
        raise InvalidMode(mode)
    return model_object(await _gateway().model(model_id, mode))


@bp.post("/v1/chat/completions")
@_documented(None, 404, 409, 502, body=ChatCompletionBody)
async def chat_completions() -> Response | dict[str, Any]:
    body = parse_chat_completion(await request.get_json())
    gateway = _gateway()
    if not body.stream:
        return await gateway.complete(body)
    stream = await gateway.open_stream(body)
    return sse_response(stream.frames(), stream.cancel)


@bp.post("/v1/embeddings")
@_documented(EmbeddingList, 404, 409, 502, body=EmbeddingsBody)
async def embeddings() -> dict[str, Any]:
    return await _gateway().embeddings(parse_embeddings(await request.get_json()))


@bp.post("/v1/rerank")
@bp.post("/v1/reranking")
@_documented(RerankList, 404, 409, 502, body=RerankBody)
async def rerank() -> dict[str, Any]:
    return await _gateway().rerank(parse_rerank(await request.get_json()))

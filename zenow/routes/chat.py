"""Spec section 3: `/api/chat`, streamed over SSE or answered whole."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from quart import Blueprint, Response, request

from ..chat import ChatRequest
from ..errors import InvalidRequest
from ._context import services
from ._shapes import ChatAnswer, documented
from ._sse import sse_response
from ._validation import describe_validation_error
from .sessions import SQL_INT_MAX

bp = Blueprint("chat", __name__)

SESSION_REQUIRED = "session_id is required. Please create a session first."
#: No reply needs more tokens than the largest context window llama.cpp supports.
MAX_TOKENS_LIMIT = 1_048_576


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["user", "assistant", "system"]
    content: str


class ChatBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    session_id: int = Field(ge=-SQL_INT_MAX, le=SQL_INT_MAX)
    messages: list[ChatMessage] | None = None
    #: What the original Zenow desktop front end sends instead of `messages`.
    message: ChatMessage | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    repeat_penalty: float | None = Field(None, ge=1.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    mode: Literal["llm"] = "llm"


def parse_chat(body: Any) -> ChatBody:
    """Validate a chat request; raises `InvalidRequest` with the spec's texts."""
    if not isinstance(body, dict):
        raise InvalidRequest("body: must be a JSON object")
    if body.get("session_id") is None:
        raise InvalidRequest(SESSION_REQUIRED)
    try:
        chat = ChatBody.model_validate(body)
    except ValidationError as exc:
        detail = describe_validation_error(exc)
        if "mode" in detail.split(":")[0]:
            detail = f"mode: chat supports only 'llm', got {body.get('mode')!r}"
        raise InvalidRequest(detail) from None
    if chat.messages is not None and chat.message is not None:
        raise InvalidRequest("messages: give either `messages` or `message`, not both")
    if not chat.messages and chat.message is None:
        raise InvalidRequest("messages: at least one message is required")
    return chat


@bp.post("/api/chat")
@documented(ChatAnswer, 404, 502, 507, body=ChatBody)
async def chat() -> Response | dict[str, Any]:
    body = parse_chat(await request.get_json())
    turns = body.messages if body.messages is not None else [body.message] if body.message else []
    chat_request = ChatRequest(
        session_id=body.session_id,
        messages=[(m.role, m.content) for m in turns],
        temperature=body.temperature, repeat_penalty=body.repeat_penalty, max_tokens=body.max_tokens,
    )
    streamer = services().chat
    if not body.stream:
        result = await streamer.complete(chat_request)
        return {
            "choices": [{"message": {"role": "assistant", "content": result.content},
                         "finish_reason": result.finish_reason}],
            "usage": result.usage or {},
            "session_id": body.session_id,
        }

    stream = await streamer.open(chat_request)
    return sse_response(stream.frames(), stream.cancel)

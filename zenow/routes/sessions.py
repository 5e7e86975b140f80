"""Spec section 2: chat sessions and their messages."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from quart import Blueprint, Response
from quart_schema import validate_request

from ..errors import InvalidRequest
from ..store import SessionInfo
from ._context import json_answer, json_body, json_bytes_answer, services
from ._shapes import (
    AddedMessage,
    CreatedSession,
    Done,
    MessageList,
    Session,
    SessionList,
    documented,
    message_json,
    session_json,
)
from ._validation import validate_querystring

bp = Blueprint("sessions", __name__)

SESSION_NAME_MAX = 50
RENAME_MAX = 200
#: The largest integer SQLite stores: ids, offsets and limits beyond it are the caller's error.
SQL_INT_MAX = 2**63 - 1


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class CreateSession(_Body):
    first_message: str


class RenameSession(_Body):
    #: Whitespace is collapsed; what is left must not be empty nor longer than RENAME_MAX.
    # a character that is not whitespace to Python's str.split() either (it also splits on \x1c-\x1f)
    new_name: str = Field(pattern=r"[^\s\x1c-\x1f]", json_schema_extra={"maxLength": RENAME_MAX})


class AddMessage(_Body):
    role: Literal["user", "assistant", "system"]
    content: str


class SessionPage(BaseModel):
    limit: int = Field(100, ge=0, le=10_000)
    offset: int = Field(0, ge=0, le=SQL_INT_MAX)


class MessagePage(BaseModel):
    limit: int | None = Field(None, ge=0, le=SQL_INT_MAX)


#: The largest id a path may name: 18 digits, well inside SQLite's 64-bit integers.
ID_MAX = 10**18 - 1
_INTEGER = re.compile(r"^-?\d{1,18}$")


def parse_id(raw: str, field: str) -> int:
    """A path segment as an integer id; raises `InvalidRequest` naming `field`."""
    if not _INTEGER.match(raw):
        raise InvalidRequest(f"{field}: must be an integer, got {raw!r}")
    return int(raw)


def session_name_from(first_message: str) -> str:
    """The first message with whitespace collapsed, cut to 50 characters."""
    name = " ".join(first_message.split())
    return name[:SESSION_NAME_MAX] or "New chat"


@bp.post("/api/sessions")
@documented(CreatedSession, 507)
@validate_request(CreateSession)
async def create_session(data: CreateSession) -> dict[str, object]:
    session = await services().store.create_session(session_name_from(data.first_message))
    return {"session_id": session.id, "session_name": session.session_name}


@bp.get("/api/sessions")
@documented(SessionList)
@validate_querystring(SessionPage)
async def list_sessions(query_args: SessionPage) -> Response:
    return json_bytes_answer(await services().store.session_page(query_args.limit, query_args.offset, _page_json))


def _page_json(sessions: list[SessionInfo], total: int) -> bytes:
    # the store keeps this answer for the first page until the next write: fronts poll it
    return json_body({"sessions": [session_json(s) for s in sessions], "total": total})


@bp.get("/api/sessions/<session_id>")
@documented(Session, 404)
async def get_session(session_id: str) -> dict[str, object]:
    return session_json(await services().store.get_session(parse_id(session_id, "session_id")))


@bp.put("/api/sessions/<session_id>/name")
@documented(Done, 404, 507)
@validate_request(RenameSession)
async def rename_session(session_id: str, data: RenameSession) -> dict[str, object]:
    sid = parse_id(session_id, "session_id")
    name = " ".join(data.new_name.split())
    if not name:
        raise InvalidRequest("new_name: must not be empty")
    if len(name) > RENAME_MAX:
        raise InvalidRequest(f"new_name: at most {RENAME_MAX} characters")
    await services().store.rename_session(sid, name)
    return {"success": True, "message": "Session name updated"}


@bp.delete("/api/sessions/<session_id>")
@documented(Done, 404)
async def delete_session(session_id: str) -> dict[str, object]:
    await services().store.delete_session(parse_id(session_id, "session_id"))
    return {"success": True, "message": "Session deleted"}


@bp.get("/api/sessions/<session_id>/messages")
@documented(MessageList, 404)
@validate_querystring(MessagePage)
async def get_messages(session_id: str, query_args: MessagePage) -> Response:
    sid = parse_id(session_id, "session_id")
    messages, total_tokens = await services().store.get_messages(sid, query_args.limit)
    return json_answer({
        "messages": [message_json(m) for m in messages],
        "session_id": sid,
        "total_tokens": total_tokens,
    })


@bp.post("/api/sessions/<session_id>/messages")
@documented(AddedMessage, 404, 507)
@validate_request(AddMessage)
async def add_message(session_id: str, data: AddMessage) -> Response:
    sid = parse_id(session_id, "session_id")
    svc = services()
    await svc.store.get_session(sid)  # 404 before spending a tokenizer call
    tokens = await svc.tokens.count(data.content)
    message = await svc.store.add_message(sid, data.role, data.content, tokens)
    return json_answer({"message_id": message.id, "token_count": message.token_count})


@bp.delete("/api/sessions/<session_id>/messages")
@documented(Done, 404, 507)
async def clear_messages(session_id: str) -> dict[str, object]:
    await services().store.clear_messages(parse_id(session_id, "session_id"))
    return {"success": True, "message": "Messages cleared"}

"""What the store hands out: immutable records, one per row kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DownloadRecord", "MessageInfo", "ModelInfo", "Role", "SessionInfo"]

Role = Literal["user", "assistant", "system"]
DownloadStatus = Literal["downloading", "completed", "failed"]


@dataclass(frozen=True, slots=True)
class SessionInfo:
    id: int
    session_name: str
    created_at: str
    updated_at: str
    message_count: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class MessageInfo:
    id: int
    session_id: int
    role: Role
    content: str
    token_count: int
    created_at: str


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: int
    name: str
    path: str
    mode: str
    source_url: str | None
    size: int | None
    #: Whether the file existed when the record was read (the store checks it).
    is_downloaded: bool


@dataclass(frozen=True, slots=True)
class DownloadRecord:
    url: str
    filename: str
    mode: str
    status: DownloadStatus
    downloaded: int
    total: int | None
    error: str | None
    sha256: str | None

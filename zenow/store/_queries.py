"""The store's queries: plain synchronous functions over one sqlite3 connection.

The store actor runs each one in a worker thread, one at a time; a function is
one transaction.  They raise `SessionNotFound` / `ModelNotFound` for missing
rows and let `sqlite3.Error` through (the actor translates it).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import SessionNotFound
from ._records import DownloadRecord, MessageInfo, ModelDetails, ModelInfo, SessionInfo
from ._schema import migrate

BUSY_TIMEOUT_MS = 5000

log = logging.getLogger(__name__)


def now() -> str:
    """Local time with microseconds: sorts correctly, shown to clients to the second."""
    return datetime.now().isoformat(timespec="microseconds")


def shown(timestamp: str) -> str:
    """A stored timestamp as the spec shows it: `2026-01-26T10:30:00`."""
    return timestamp[:19]


def open_database(path: Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the database at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


class _Transaction:
    """`with _Transaction(conn):` runs the block in BEGIN IMMEDIATE ... COMMIT, or ROLLBACK."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


# ---------------------------------------------------------------- sessions

_SESSION_SELECT = "SELECT id, session_name, created_at, updated_at, message_count, total_tokens FROM sessions"


def _session(row: tuple[Any, ...]) -> SessionInfo:
    return SessionInfo(row[0], row[1], shown(row[2]), shown(row[3]), row[4], row[5])


def _require_session(conn: sqlite3.Connection, session_id: int) -> None:
    if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
        raise SessionNotFound()


def create_session(conn: sqlite3.Connection, name: str) -> SessionInfo:
    stamp = now()
    with _Transaction(conn):
        cur = conn.execute(
            "INSERT INTO sessions (session_name, created_at, updated_at) VALUES (?, ?, ?)",
            (name, stamp, stamp),
        )
    return SessionInfo(int(cur.lastrowid or 0), name, shown(stamp), shown(stamp), 0, 0)


def get_session(conn: sqlite3.Connection, session_id: int) -> SessionInfo:
    row = conn.execute(_SESSION_SELECT + " WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        raise SessionNotFound()
    return _session(row)


def list_sessions(conn: sqlite3.Connection, limit: int, offset: int) -> tuple[list[SessionInfo], int]:
    with _Transaction(conn):  # one snapshot for the page and the total
        rows = conn.execute(
            _SESSION_SELECT + " ORDER BY updated_at DESC, id DESC LIMIT ? OFFSET ?",
            (limit, offset),
        ).fetchall()
        (total,) = conn.execute("SELECT sessions FROM session_count").fetchone()  # kept by triggers
    return [_session(r) for r in rows], int(total)


def rename_session(conn: sqlite3.Connection, session_id: int, name: str) -> None:
    with _Transaction(conn):
        cur = conn.execute("UPDATE sessions SET session_name = ? WHERE id = ?", (name, session_id))
        if cur.rowcount == 0:
            raise SessionNotFound()


def delete_session(conn: sqlite3.Connection, session_id: int) -> None:
    with _Transaction(conn):
        cur = conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
        if cur.rowcount == 0:
            raise SessionNotFound()


def _message(row: tuple[Any, ...]) -> MessageInfo:
    return MessageInfo(row[0], row[1], row[2], row[3], row[4], shown(row[5]))


def add_message(
    conn: sqlite3.Connection, session_id: int, role: str, content: str, token_count: int
) -> MessageInfo:
    stamp = now()
    with _Transaction(conn):
        _require_session(conn, session_id)
        cur = conn.execute(
            "INSERT INTO messages (session_id, role, content, token_count, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (session_id, role, content, token_count, stamp),
        )
        conn.execute(
            "UPDATE sessions SET updated_at = ?, message_count = message_count + 1,"
            " total_tokens = total_tokens + ? WHERE id = ?",
            (stamp, token_count, session_id),
        )
    return MessageInfo(int(cur.lastrowid or 0), session_id, role, content, token_count, shown(stamp))  # type: ignore[arg-type]


_MESSAGE_COLUMNS = "id, session_id, role, content, token_count, created_at"


def get_messages(
    conn: sqlite3.Connection, session_id: int, limit: int | None
) -> tuple[list[MessageInfo], int]:
    """The session's messages oldest first (only the newest `limit` when given), and its token total."""
    with _Transaction(conn):  # one snapshot for the messages and the total
        found = conn.execute("SELECT total_tokens FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if found is None:
            raise SessionNotFound()
        if limit is None:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY id", (session_id,)
            ).fetchall()
        else:
            rows = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY id DESC LIMIT ?",
                (session_id, limit),
            ).fetchall()[::-1]
    return [_message(r) for r in rows], int(found[0])


def newest_messages(
    conn: sqlite3.Connection, session_id: int, before_id: int | None, count: int
) -> list[MessageInfo]:
    """Up to `count` messages of the session, newest first, older than `before_id` when given."""
    _require_session(conn, session_id)
    bound = before_id if before_id is not None else -1
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? AND (? < 0 OR id < ?)"
        " ORDER BY id DESC LIMIT ?",
        (session_id, bound, bound, count),
    ).fetchall()
    return [_message(r) for r in rows]


def session_with_newest_messages(
    conn: sqlite3.Connection, session_id: int, count: int
) -> tuple[SessionInfo, list[MessageInfo]]:
    """The session and up to `count` of its newest messages, newest first, from one snapshot."""
    with _Transaction(conn):
        session = get_session(conn, session_id)
        rows = conn.execute(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY id DESC LIMIT ?",
            (session_id, count),
        ).fetchall()
    return session, [_message(r) for r in rows]


def clear_messages(conn: sqlite3.Connection, session_id: int) -> None:
    with _Transaction(conn):
        _require_session(conn, session_id)
        conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
        conn.execute(
            "UPDATE sessions SET updated_at = ?, message_count = 0, total_tokens = 0 WHERE id = ?", (now(), session_id)
        )


# ---------------------------------------------------------------- models

_MODEL_COLUMNS = "id, name, path, mode, source_url, size, details"


def _model(row: tuple[Any, ...]) -> ModelInfo:
    return ModelInfo(row[0], row[1], row[2], row[3], row[4], row[5], os.path.isfile(row[2]),
                     ModelDetails.from_json(row[6]))


def register_model(
    conn: sqlite3.Connection, mode: str, name: str, path: str,
    source_url: str | None = None, size: int | None = None, details: ModelDetails | None = None,
) -> ModelInfo:
    """Add a model, or update the path/source/size/details of the model with that name in that mode."""
    with _Transaction(conn):
        conn.execute(
            "INSERT INTO models (name, path, mode, source_url, size, details, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (mode, name) DO UPDATE SET path = excluded.path,"
            " source_url = COALESCE(excluded.source_url, models.source_url),"
            " size = COALESCE(excluded.size, models.size),"
            " details = COALESCE(excluded.details, models.details)",
            (name, path, mode, source_url, size, None if details is None else details.to_json(), now()),
        )
        row = conn.execute(
            f"SELECT {_MODEL_COLUMNS} FROM models WHERE mode = ? AND name = ?", (mode, name)
        ).fetchone()
    return _model(row)


def list_models(conn: sqlite3.Connection, mode: str | None) -> list[ModelInfo]:
    if mode is None:
        rows = conn.execute(f"SELECT {_MODEL_COLUMNS} FROM models ORDER BY id").fetchall()
    else:
        rows = conn.execute(
            f"SELECT {_MODEL_COLUMNS} FROM models WHERE mode = ? ORDER BY id", (mode,)
        ).fetchall()
    return [_model(r) for r in rows]


def find_model(conn: sqlite3.Connection, mode: str, name: str) -> ModelInfo | None:
    row = conn.execute(
        f"SELECT {_MODEL_COLUMNS} FROM models WHERE mode = ? AND name = ?", (mode, name)
    ).fetchone()
    return _model(row) if row else None


def current_model(conn: sqlite3.Connection, mode: str) -> ModelInfo | None:
    row = conn.execute(
        f"SELECT {', '.join('m.' + c.strip() for c in _MODEL_COLUMNS.split(','))}"
        " FROM current_models c JOIN models m ON m.id = c.model_id WHERE c.mode = ?",
        (mode,),
    ).fetchone()
    return _model(row) if row else None


def set_current_model(conn: sqlite3.Connection, mode: str, model_id: int | None) -> None:
    with _Transaction(conn):
        conn.execute(
            "INSERT INTO current_models (mode, model_id) VALUES (?, ?)"
            " ON CONFLICT (mode) DO UPDATE SET model_id = excluded.model_id",
            (mode, model_id),
        )


# ---------------------------------------------------------------- parameters


def get_parameters(conn: sqlite3.Connection, mode: str) -> dict[str, Any]:
    """The stored (non-default) parameters of a mode, decoded from JSON.

    A value that is not JSON (written by hand, or by something else) is left out and
    logged: the mode then uses that parameter's default, and keeps every other one.
    """
    rows = conn.execute("SELECT key, value FROM parameters WHERE mode = ?", (mode,)).fetchall()
    decoded: dict[str, Any] = {}
    for key, value in rows:
        try:
            decoded[key] = json.loads(value)
        except (TypeError, ValueError):
            log.warning("stored parameter %s.%s is not JSON (%r); using its default", mode, key, value)
    return decoded


def set_parameters(conn: sqlite3.Connection, mode: str, values: dict[str, Any]) -> None:
    with _Transaction(conn):
        conn.executemany(
            "INSERT INTO parameters (mode, key, value) VALUES (?, ?, ?)"
            " ON CONFLICT (mode, key) DO UPDATE SET value = excluded.value",
            [(mode, key, json.dumps(value)) for key, value in values.items()],
        )


# ---------------------------------------------------------------- downloads

_DOWNLOAD_COLUMNS = "url, filename, mode, status, downloaded, total, error, sha256"


def _download(row: tuple[Any, ...]) -> DownloadRecord:
    return DownloadRecord(*row)


def save_download(conn: sqlite3.Connection, record: DownloadRecord) -> None:
    with _Transaction(conn):
        conn.execute(
            f"INSERT INTO downloads ({_DOWNLOAD_COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (url) DO UPDATE SET filename = excluded.filename, mode = excluded.mode,"
            " status = excluded.status, downloaded = excluded.downloaded, total = excluded.total,"
            " error = excluded.error, sha256 = excluded.sha256, updated_at = excluded.updated_at",
            (record.url, record.filename, record.mode, record.status, record.downloaded,
             record.total, record.error, record.sha256, now()),
        )


def delete_download(conn: sqlite3.Connection, url: str) -> None:
    """Forget the download of `url` (no error when there is none)."""
    with _Transaction(conn):
        conn.execute("DELETE FROM downloads WHERE url = ?", (url,))


def list_downloads(conn: sqlite3.Connection) -> list[DownloadRecord]:
    rows = conn.execute(f"SELECT {_DOWNLOAD_COLUMNS} FROM downloads ORDER BY updated_at").fetchall()
    return [_download(r) for r in rows]

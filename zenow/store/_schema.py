"""The database schema, versioned with `PRAGMA user_version`.

`MIGRATIONS[n]` takes a database at version n to version n + 1.  Never edit a
migration that has shipped; append a new one.
"""

from __future__ import annotations

import sqlite3

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate"]

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: sessions and their messages
    """
    CREATE TABLE sessions (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        session_name TEXT NOT NULL,
        created_at   TEXT NOT NULL,
        updated_at   TEXT NOT NULL
    );
    CREATE INDEX sessions_by_update ON sessions (updated_at DESC, id DESC);
    CREATE TABLE messages (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id  INTEGER NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        role        TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
        content     TEXT NOT NULL,
        token_count INTEGER NOT NULL CHECK (token_count >= 0),
        created_at  TEXT NOT NULL
    );
    CREATE INDEX messages_by_session ON messages (session_id, id);
    """,
    # 1 -> 2: the model registry, per-mode parameters and current models, downloads
    """
    CREATE TABLE models (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        name       TEXT NOT NULL,
        path       TEXT NOT NULL,
        mode       TEXT NOT NULL CHECK (mode IN ('llm', 'embed', 'rerank')),
        source_url TEXT,
        size       INTEGER,
        created_at TEXT NOT NULL,
        UNIQUE (mode, name)
    );
    CREATE TABLE current_models (
        mode     TEXT PRIMARY KEY CHECK (mode IN ('llm', 'embed', 'rerank')),
        model_id INTEGER REFERENCES models (id) ON DELETE SET NULL
    );
    CREATE TABLE parameters (
        mode  TEXT NOT NULL CHECK (mode IN ('llm', 'embed', 'rerank')),
        key   TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (mode, key)
    );
    CREATE TABLE downloads (
        url        TEXT PRIMARY KEY,
        filename   TEXT NOT NULL,
        mode       TEXT NOT NULL CHECK (mode IN ('llm', 'embed', 'rerank')),
        status     TEXT NOT NULL CHECK (status IN ('downloading', 'completed', 'failed')),
        downloaded INTEGER NOT NULL DEFAULT 0,
        total      INTEGER,
        error      TEXT,
        sha256     TEXT,
        updated_at TEXT NOT NULL
    );
    """,
    # 2 -> 3: each session keeps its message count and token total, so listing a page of
    # sessions reads that page through `sessions_by_update` instead of grouping every message
    """
    ALTER TABLE sessions ADD COLUMN message_count INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN total_tokens INTEGER NOT NULL DEFAULT 0;
    UPDATE sessions SET
        message_count = (SELECT COUNT(*) FROM messages m WHERE m.session_id = sessions.id),
        total_tokens = (SELECT COALESCE(SUM(token_count), 0) FROM messages m WHERE m.session_id = sessions.id);
    """,
    # 3 -> 4: what each model's GGUF header says (JSON of `ModelDetails`), read when it is registered
    """
    ALTER TABLE models ADD COLUMN details TEXT;
    """,
    # 4 -> 5: the number of sessions kept in one row by triggers, so the list's `total` is read,
    # not counted (COUNT(*) walks a whole index: linear in the sessions)
    """
    CREATE TABLE session_count (one INTEGER PRIMARY KEY CHECK (one = 1), sessions INTEGER NOT NULL);
    INSERT INTO session_count (one, sessions) SELECT 1, COUNT(*) FROM sessions;
    CREATE TRIGGER session_counted AFTER INSERT ON sessions
        BEGIN UPDATE session_count SET sessions = sessions + 1; END;
    CREATE TRIGGER session_uncounted AFTER DELETE ON sessions
        BEGIN UPDATE session_count SET sessions = sessions - 1; END;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring `conn` to `SCHEMA_VERSION`, one transaction per step; return the old version.

    Raises `RuntimeError` for a database newer than this zenow understands.
    """
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"the database is at schema version {version}, newer than this zenow ({SCHEMA_VERSION})"
        )
    for step in range(version, SCHEMA_VERSION):
        # executescript commits first; the BEGIN makes each step all-or-nothing.
        try:
            conn.executescript(f"BEGIN; {MIGRATIONS[step]}; PRAGMA user_version = {step + 1}; COMMIT;")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return version

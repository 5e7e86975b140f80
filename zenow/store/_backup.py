"""A consistent copy of the database while zenow runs (SQLite's online backup API)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

__all__ = ["backup_database"]


def backup_database(source: Path, target: Path) -> int:
    """Copy the database at `source` to `target` consistently, even while zenow writes to it.

    The copy is written next to `target` and renamed into place once complete and
    checked (`PRAGMA integrity_check`), so `target` is never half-written.  Returns the
    number of sessions copied.  Raises `FileNotFoundError` when there is no database at
    `source`, `sqlite3.Error` when the copy fails.
    """
    if not source.is_file():
        raise FileNotFoundError(f"no database at {source}")
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    reader = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
    try:
        writer = sqlite3.connect(partial)
        try:
            reader.backup(writer, pages=1024)  # in steps, so zenow's writers are not held up
            writer.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
            (check,) = writer.execute("PRAGMA integrity_check").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(f"the copy failed its integrity check: {check}")
            (sessions,) = writer.execute("SELECT COUNT(*) FROM sessions").fetchone()
        finally:
            writer.close()
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        reader.close()
    return int(sessions)

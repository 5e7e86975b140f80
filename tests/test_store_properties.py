"""Property tests of the store's queries over a real SQLite file: any sequence of session and
message operations keeps each session's counters equal to what is stored, in a stable order."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zenow.errors import SessionNotFound
from zenow.store import _queries as q

operation = st.one_of(
    st.tuples(st.just("create"), st.text(max_size=20)),
    st.tuples(st.just("add"), st.integers(0, 5), st.sampled_from(["user", "assistant", "system"]),
              st.text(max_size=30), st.integers(0, 10_000)),
    st.tuples(st.just("clear"), st.integers(0, 5)),
    st.tuples(st.just("delete"), st.integers(0, 5)),
    st.tuples(st.just("rename"), st.integers(0, 5), st.text(min_size=1, max_size=20)),
)


def run(conn: sqlite3.Connection, ops: list[tuple]) -> list[int]:
    ids: list[int] = []
    for op in ops:
        try:
            if op[0] == "create":
                ids.append(q.create_session(conn, op[1] or "New chat").id)
            elif not ids:
                continue
            elif op[0] == "add":
                q.add_message(conn, ids[op[1] % len(ids)], op[2], op[3], op[4])
            elif op[0] == "clear":
                q.clear_messages(conn, ids[op[1] % len(ids)])
            elif op[0] == "delete":
                q.delete_session(conn, ids[op[1] % len(ids)])
            else:
                q.rename_session(conn, ids[op[1] % len(ids)], op[2])
        except SessionNotFound:
            pass  # an operation on a session deleted earlier in the sequence
    return ids


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, max_size=40))
def test_counters_match_the_stored_messages_and_order_is_stable(ops):
    with tempfile.TemporaryDirectory() as folder:
        conn = q.open_database(Path(folder) / "zenow.db")
        try:
            run(conn, ops)
            sessions, total = q.list_sessions(conn, 10_000, 0)
            assert total == len(sessions) == conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0]
            for session in sessions:
                messages, tokens = q.get_messages(conn, session.id, None)
                assert session.message_count == len(messages)
                assert session.total_tokens == tokens == sum(m.token_count for m in messages)
                newest, newest_tokens = q.get_messages(conn, session.id, 2)
                assert newest == messages[-2:] and newest_tokens == tokens
                assert [m.id for m in messages] == sorted(m.id for m in messages)
                assert q.get_session(conn, session.id) == session
            newest_first = [row[0] for row in conn.execute("SELECT id FROM sessions ORDER BY updated_at DESC, id DESC")]
            assert [s.id for s in sessions] == newest_first
            pages = [s for offset in range(0, total, 3) for s in q.list_sessions(conn, 3, offset)[0]]
            assert pages == sessions  # paging walks the same order without gaps or repeats
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        finally:
            conn.close()


def test_a_version_2_database_gets_its_counters_on_upgrade(tmp_path):
    from zenow.store._schema import MIGRATIONS

    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    for step in range(2):
        old.executescript(f"BEGIN; {MIGRATIONS[step]}; PRAGMA user_version = {step + 1}; COMMIT;")
    old.execute("INSERT INTO sessions (session_name, created_at, updated_at) VALUES ('s', 't', 't')")
    old.executemany("INSERT INTO messages (session_id, role, content, token_count, created_at)"
                    " VALUES (1, 'user', ?, ?, 't')", [("a", 3), ("b", 4)])
    old.close()
    conn = q.open_database(path)
    try:
        session = q.get_session(conn, 1)
        assert (session.message_count, session.total_tokens) == (2, 7)
    finally:
        conn.close()


def test_a_version_4_database_gets_its_session_count_on_upgrade(tmp_path):
    from zenow.store._schema import MIGRATIONS

    path = tmp_path / "old.db"
    old = sqlite3.connect(path, isolation_level=None)
    for step in range(4):
        old.executescript(f"BEGIN; {MIGRATIONS[step]}; PRAGMA user_version = {step + 1}; COMMIT;")
    old.executemany("INSERT INTO sessions (session_name, created_at, updated_at) VALUES (?, 't', 't')",
                    [("a",), ("b",), ("c",)])
    old.close()
    conn = q.open_database(path)
    try:
        assert q.list_sessions(conn, 1, 0)[1] == 3
        q.delete_session(conn, q.create_session(conn, "d").id - 2)
        assert q.list_sessions(conn, 10, 0)[1] == 3
    finally:
        conn.close()


@pytest.mark.parametrize("sessions", [0, 1])
def test_the_session_list_reads_a_page_by_index(tmp_path, sessions):
    conn = q.open_database(tmp_path / "zenow.db")
    try:
        plan = " ".join(row[-1] for row in conn.execute(
            "EXPLAIN QUERY PLAN " + q._SESSION_SELECT + " ORDER BY updated_at DESC, id DESC LIMIT 10 OFFSET 0"))
        assert "sessions_by_update" in plan and "TEMP B-TREE" not in plan
    finally:
        conn.close()


async def test_backup_while_zenow_runs_restores_every_session(nursery, tmp_path):
    import sys

    import trio

    from tests.support.harness import REPO, add_message, create_session, make_settings, start_zenow

    settings = make_settings(tmp_path / "home")
    async with start_zenow(nursery, settings) as zenow:
        for i in range(20):
            sid = (await create_session(zenow.client, f"session {i}"))["session_id"]
            await add_message(zenow.client, sid, "user", f"message {i}")
        out = tmp_path / "backup.db"
        result = await trio.run_process(
            [sys.executable, "-m", "zenow", "backup", str(out), "--home", str(settings.home)],
            capture_stdout=True, capture_stderr=True, cwd=REPO, check=False)
        assert result.returncode == 0, result.stderr
        assert b"20 sessions" in result.stdout
        await add_message(zenow.client, sid, "user", "written after the backup")
    restored = tmp_path / "restored"
    restored.mkdir()
    out.rename(restored / "zenow.db")
    async with start_zenow(nursery, make_settings(restored)) as again:
        listing = (await again.client.get("/api/sessions")).json()
        assert listing["total"] == 20
        assert {s["message_count"] for s in listing["sessions"]} == {1}


def test_a_stored_parameter_that_is_not_json_is_left_out_and_the_others_kept(tmp_path, caplog):
    conn = q.open_database(tmp_path / "zenow.db")
    try:
        q.set_parameters(conn, "llm", {"temperature": 0.3, "threads": 2})
        conn.execute("UPDATE parameters SET value = 'not json {' WHERE key = 'threads'")
        assert q.get_parameters(conn, "llm") == {"temperature": 0.3}
        assert "llm.threads is not JSON" in caplog.text
    finally:
        conn.close()

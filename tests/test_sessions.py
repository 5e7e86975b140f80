"""Spec section 2 over real HTTP: every sessions endpoint and its error cases."""

from __future__ import annotations

import re

import pytest
import trio

from tests.support.harness import add_message, create_session

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")


async def next_second():
    """Wait until the wall clock shows a new second (timestamps are shown to the second)."""
    from datetime import datetime

    start = datetime.now().replace(microsecond=0)
    while datetime.now().replace(microsecond=0) <= start:
        await trio.sleep(0.02)


async def test_health_identifies_zenow(client):
    response = await client.get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy" and body["app"] == "zenow" and body["version"]


async def test_create_names_the_session_after_the_first_message(client):
    created = await create_session(client, "你好，请介绍一下自己")
    assert created == {"session_id": created["session_id"], "session_name": "你好，请介绍一下自己"}
    long = "x" * 30 + " " + "长" * 40
    named = await create_session(client, long)
    assert named["session_name"] == long[:50]
    assert len(named["session_name"]) == 50


async def test_detail_has_the_spec_shape(client):
    sid = (await create_session(client))["session_id"]
    detail = (await client.get(f"/api/sessions/{sid}")).json()
    assert set(detail) == {"id", "session_name", "created_at", "updated_at", "message_count", "total_tokens"}
    assert detail["id"] == sid and detail["message_count"] == 0 and detail["total_tokens"] == 0
    assert TIMESTAMP.match(detail["created_at"]) and TIMESTAMP.match(detail["updated_at"])


async def test_messages_keep_counts_and_updated_at_in_step(client):
    sid = (await create_session(client))["session_id"]
    before = (await client.get(f"/api/sessions/{sid}")).json()
    await next_second()
    first = await add_message(client, sid, "user", "你好，请介绍一下自己")
    second = await add_message(client, sid, "assistant", "Hello! I am an AI assistant, here to help.")
    third = await add_message(client, sid, "system", "Be brief.")
    assert first["token_count"] > 0 and second["token_count"] > 0
    assert third["message_id"] > second["message_id"] > first["message_id"]

    detail = (await client.get(f"/api/sessions/{sid}")).json()
    assert detail["message_count"] == 3
    assert detail["total_tokens"] == first["token_count"] + second["token_count"] + third["token_count"]
    assert detail["updated_at"] > before["updated_at"]

    listed = (await client.get(f"/api/sessions/{sid}/messages")).json()
    assert listed["session_id"] == sid
    assert listed["total_tokens"] == detail["total_tokens"]
    assert [m["role"] for m in listed["messages"]] == ["user", "assistant", "system"]
    assert listed["messages"][0]["content"] == "你好，请介绍一下自己"
    message = listed["messages"][0]
    assert set(message) == {"id", "session_id", "role", "content", "token_count", "created_at"}
    assert message["token_count"] == first["token_count"] and TIMESTAMP.match(message["created_at"])


async def test_message_limit_returns_the_newest_oldest_first(client):
    sid = (await create_session(client))["session_id"]
    for i in range(5):
        await add_message(client, sid, "user", f"message {i}")
    newest = (await client.get(f"/api/sessions/{sid}/messages", params={"limit": 2})).json()
    assert [m["content"] for m in newest["messages"]] == ["message 3", "message 4"]
    assert newest["total_tokens"] == (await client.get(f"/api/sessions/{sid}")).json()["total_tokens"]


async def test_list_is_newest_first_with_paging_and_total(client):
    ids = [(await create_session(client, f"session {i}"))["session_id"] for i in range(4)]
    await add_message(client, ids[0], "user", "bump the oldest")  # now the most recently updated
    page = (await client.get("/api/sessions")).json()
    assert page["total"] == 4
    assert [s["id"] for s in page["sessions"]] == [ids[0], ids[3], ids[2], ids[1]]
    assert page["sessions"][0]["message_count"] == 1
    second = (await client.get("/api/sessions", params={"limit": 2, "offset": 1})).json()
    assert [s["id"] for s in second["sessions"]] == [ids[3], ids[2]]
    assert second["total"] == 4


async def test_rename(client):
    sid = (await create_session(client))["session_id"]
    response = await client.put(f"/api/sessions/{sid}/name", json={"new_name": "关于 AI 的讨论"})
    assert response.json() == {"success": True, "message": "Session name updated"}
    assert (await client.get(f"/api/sessions/{sid}")).json()["session_name"] == "关于 AI 的讨论"


async def test_delete_takes_the_messages_with_it(client, zenow):
    sid = (await create_session(client))["session_id"]
    await add_message(client, sid, "user", "hello")
    response = await client.delete(f"/api/sessions/{sid}")
    assert response.json() == {"success": True, "message": "Session deleted"}
    assert (await client.get(f"/api/sessions/{sid}")).status_code == 404
    assert (await client.get(f"/api/sessions/{sid}/messages")).status_code == 404
    import sqlite3

    with sqlite3.connect(zenow.settings.database_path) as db:
        assert db.execute("SELECT COUNT(*) FROM messages WHERE session_id = ?", (sid,)).fetchone() == (0,)


async def test_clear_messages_keeps_the_session(client):
    sid = (await create_session(client))["session_id"]
    await add_message(client, sid, "user", "hello")
    before = (await client.get(f"/api/sessions/{sid}")).json()
    await next_second()
    response = await client.delete(f"/api/sessions/{sid}/messages")
    assert response.json() == {"success": True, "message": "Messages cleared"}
    after = (await client.get(f"/api/sessions/{sid}")).json()
    assert after["message_count"] == 0 and after["total_tokens"] == 0
    assert after["updated_at"] > before["updated_at"]
    assert (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"] == []


async def test_chinese_and_a_100_kb_message_round_trip(client):
    sid = (await create_session(client, "中文会话"))["session_id"]
    big = ("零一二三四五六七八九" * 3500)[:35_000]  # 105 KB of UTF-8
    assert len(big.encode()) > 100_000
    added = await add_message(client, sid, "user", big)
    assert added["token_count"] >= 35_000 // 2
    messages = (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
    assert messages[0]["content"] == big


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/api/sessions", {}, "first_message"),
        ("POST", "/api/sessions", {"first_message": 5}, "first_message"),
        ("PUT", "/api/sessions/{sid}/name", {"new_name": None}, "new_name"),
        ("PUT", "/api/sessions/{sid}/name", {"new_name": "   "}, "new_name"),
        ("POST", "/api/sessions/{sid}/messages", {"role": "robot", "content": "x"}, "role"),
        ("POST", "/api/sessions/{sid}/messages", {"role": "user"}, "content"),
        ("POST", "/api/sessions/{sid}/messages", {"role": "user", "content": ["x"]}, "content"),
        ("GET", "/api/sessions?limit=-1", None, "limit"),
        ("GET", "/api/sessions?offset=-5", None, "offset"),
        ("GET", "/api/sessions?limit=ten", None, "limit"),
        ("GET", "/api/sessions/{sid}/messages?limit=-2", None, "limit"),
        ("GET", "/api/sessions/abc", None, "session_id"),
        ("DELETE", "/api/sessions/1.5", None, "session_id"),
        ("GET", "/api/sessions/abc/messages", None, "session_id"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(client, method, path, body, field):
    sid = (await create_session(client))["session_id"]
    response = await client.request(method, path.format(sid=sid), json=body)
    assert response.status_code == 400, response.text
    assert field in response.json()["detail"]
    assert (await client.get(f"/api/sessions/{sid}")).json()["message_count"] == 0


async def test_malformed_json_is_a_400(client):
    response = await client.post("/api/sessions", content=b'{"first_message": ',
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["detail"]
    assert (await client.get("/api/sessions")).json()["total"] == 0


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/sessions/999", None),
        ("DELETE", "/api/sessions/999", None),
        ("PUT", "/api/sessions/999/name", {"new_name": "x"}),
        ("GET", "/api/sessions/999/messages", None),
        ("POST", "/api/sessions/999/messages", {"role": "user", "content": "x"}),
        ("DELETE", "/api/sessions/999/messages", None),
    ],
)
async def test_unknown_session_is_a_404(client, method, path, body):
    response = await client.request(method, path, json=body)
    assert response.status_code == 404
    assert response.json() == {"detail": "Session not found"}


async def test_unknown_route_answers_json(client):
    response = await client.get("/api/nothing-here")
    assert response.status_code == 404
    assert "detail" in response.json()


async def test_openapi_document_lists_the_sessions_api(client):
    document = (await client.get("/openapi.json")).json()
    assert "/api/sessions" in document["paths"]


async def test_a_database_failure_is_a_500_with_detail_and_zenow_keeps_serving(nursery, tmp_path):
    import sqlite3

    from tests.support.harness import make_settings, start_zenow

    settings = make_settings(tmp_path / "home", db_busy_timeout=0.2)
    async with start_zenow(nursery, settings) as zenow:
        sid = (await create_session(zenow.client))["session_id"]
        blocker = sqlite3.connect(settings.database_path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
        try:
            response = await zenow.client.post(f"/api/sessions/{sid}/messages", json={"role": "user", "content": "x"})
            assert response.status_code == 500
            assert response.json()["detail"].startswith("Database error: database is locked")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await add_message(zenow.client, sid, "user", "after the lock")
        assert (await zenow.client.get(f"/api/sessions/{sid}")).json()["message_count"] == 1

"""Hostile and careless input: every bad request is the caller's 4xx, never a crash.

Each test here failed on the code before the fix: an actor crashed (six crashes in
a minute stopped zenow), a 500 was answered, or a cross-site page could write.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace

import httpx
import pytest
import trio

from tests.support.harness import add_message, create_session, start_zenow

BIG = 2**63  # one past the largest integer SQLite stores
SURROGATE = "\ud800"


def raw_json(body: object) -> dict:
    """Request arguments sending `body` as JSON text with escapes (httpx cannot encode a lone surrogate)."""
    return {"content": json.dumps(body), "headers": {"Content-Type": "application/json"}}


async def assert_healthy(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/health")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "healthy"


@pytest.mark.parametrize(("path", "field"), [
    (f"/api/sessions?offset={BIG}", "offset"),
    (f"/api/sessions?offset={2**70}", "offset"),
    (f"/api/sessions/1/messages?limit={BIG}", "limit"),
])
async def test_numbers_sqlite_cannot_hold_are_a_400_and_no_crash(client, path, field):
    await create_session(client)
    for _ in range(8):  # more than the store's restart budget (5 a minute)
        response = await client.get(path)
        assert response.status_code == 400, response.text
        assert field in response.json()["detail"]
    await assert_healthy(client)
    assert (await client.get("/api/sessions")).json()["total"] == 1


async def test_a_chat_session_id_beyond_64_bits_is_a_400(client):
    for _ in range(8):
        response = await client.post("/api/chat", json={"session_id": BIG,
                                                        "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400, response.text
        assert "session_id" in response.json()["detail"]
    await assert_healthy(client)


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("POST", "/api/sessions", {"first_message": f"a{SURROGATE}b"}, "first_message"),
    ("PUT", "/api/sessions/{sid}/name", {"new_name": SURROGATE}, "new_name"),
    ("POST", "/api/sessions/{sid}/messages", {"role": "user", "content": SURROGATE}, "content"),
    ("POST", "/api/chat", {"session_id": "{sid}", "messages": [{"role": "user", "content": SURROGATE}]},
     "messages.0.content"),
    ("POST", "/api/models/update_param?mode=llm", {"system_prompt": SURROGATE}, "system_prompt"),
    ("POST", "/api/models/load", {"model_name": f"m{SURROGATE}", "mode": "llm"}, "model_name"),
    ("POST", "/api/models/download", {"url": f"http://127.0.0.1:9/{SURROGATE}.gguf"}, "url"),
    ("POST", "/api/sessions", {f"k{SURROGATE}": "v", "first_message": "x"}, "(a key)"),
])
async def test_text_with_a_lone_surrogate_is_a_400_naming_the_field(client, method, path, body, field):
    sid = (await create_session(client))["session_id"]
    path = path.replace("{sid}", str(sid))
    if body.get("session_id") == "{sid}":
        body = {**body, "session_id": sid}
    for _ in range(8):
        response = await client.request(method, path, **raw_json(body))
        assert response.status_code == 400, response.text
        detail = response.json()["detail"]
        assert field in detail and "surrogate" in detail
    await assert_healthy(client)
    messages = (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
    assert messages == []  # nothing half-written
    parameters = await client.get("/api/models/get_param", params={"mode": "llm"})
    assert parameters.status_code == 200


async def test_a_body_that_is_not_utf8_is_a_400(client):
    response = await client.post("/api/sessions", content=b'{"first_message": "\xff\xfe"}',
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "UTF-8" in response.json()["detail"]


@pytest.mark.parametrize("depth", [50_000, 100])
async def test_json_nested_deeply_is_a_400(client, depth):
    body = '{"first_message": ' + "[" * depth + "]" * depth + "}"
    response = await client.post("/api/sessions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert "nested too deeply" in response.json()["detail"]
    await assert_healthy(client)


@pytest.mark.parametrize(("path", "body"), [
    ("/api/sessions", '{"first_message": "from evil.example"}'),
    ("/api/models/update_param?mode=llm", '{"temperature": 2.0}'),
    ("/api/models/download", '{"url": "http://127.0.0.1:9/x.gguf", "mode": "llm"}'),
    ("/api/models/load", '{"model_name": "x", "mode": "llm"}'),
    ("/api/chat", '{"session_id": 1, "messages": [{"role": "user", "content": "hi"}]}'),
    ("/api/sessions/1/messages", '{"role": "user", "content": "planted"}'),
])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
async def test_writes_without_a_json_content_type_are_refused_with_415(client, path, body, content_type):
    """A browser sends these cross-site without a preflight; CORS would only hide the answer."""
    await create_session(client, "mine")
    response = await client.post(path, content=body, headers={"Content-Type": content_type,
                                                              "Origin": "https://evil.example"})
    assert response.status_code == 415
    assert "application/json" in response.json()["detail"]
    sessions = (await client.get("/api/sessions")).json()
    assert [s["session_name"] for s in sessions["sessions"]] == ["mine"]
    assert sessions["sessions"][0]["message_count"] == 0
    assert (await client.get("/api/models/get_param", params={"mode": "llm"})).json()["temperature"] == 0.7
    assert (await client.get("/api/models/download/status")).json()["downloads"] == []


async def test_a_json_content_type_with_charset_is_accepted(client):
    response = await client.post("/api/sessions", content='{"first_message": "hi"}',
                                 headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 200


async def test_origin_null_is_refused_unless_configured(nursery, settings, client):
    preflight = {"Origin": "null", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    refused = await client.options("/api/sessions", headers=preflight)
    assert refused.status_code == 403
    assert "access-control-allow-origin" not in refused.headers
    async with start_zenow(nursery, replace(settings, home=settings.home.parent / "other",
                                            cors_origins=("null",))) as other:
        allowed = await other.client.options("/api/sessions", headers=preflight)
        assert allowed.status_code == 204
        assert allowed.headers["access-control-allow-origin"] == "null"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8050", "127.0.0.1.evil.example", "192.168.1.5:8050"])
async def test_a_foreign_host_header_is_refused_against_dns_rebinding(client, host):
    response = await client.get("/api/sessions", headers={"Host": host})
    assert response.status_code == 403
    assert "Host" in response.json()["detail"]


@pytest.mark.parametrize("host", ["localhost", "localhost:8050", "127.0.0.1:1", "[::1]:8050", "LOCALHOST"])
async def test_local_host_headers_are_served(client, host):
    response = await client.get("/api/sessions", headers={"Host": host})
    assert response.status_code == 200


async def test_allowed_host_option(nursery, settings):
    async with start_zenow(nursery, replace(settings, allowed_hosts=("zenow.lan",))) as zenow:
        response = await zenow.client.get("/api/sessions", headers={"Host": "zenow.lan:8050"})
        assert response.status_code == 200


async def test_a_body_over_the_limit_is_a_413(nursery, settings):
    async with start_zenow(nursery, replace(settings, max_body_size=1024)) as zenow:
        response = await zenow.client.post("/api/sessions", json={"first_message": "x" * 2000})
        assert response.status_code == 413
        assert "detail" in response.json()
        assert (await zenow.client.post("/api/sessions", json={"first_message": "x" * 500})).status_code == 200


async def test_a_max_tokens_beyond_any_context_is_a_400(client):
    sid = (await create_session(client))["session_id"]
    response = await client.post("/api/chat", json={"session_id": sid, "max_tokens": 10**12,
                                                    "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert "max_tokens" in response.json()["detail"]


async def test_half_sent_requests_are_dropped_and_capped(nursery, settings):
    """Slow clients hold neither a task for long nor every connection slot."""
    settings = replace(settings, max_connections=8, keep_alive_timeout=0.5)
    async with start_zenow(nursery, settings) as zenow:
        host, port = zenow.url.removeprefix("http://").split(":")
        streams = []
        for _ in range(20):  # more than the cap: the rest wait in the listen backlog
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(b"GET /api/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            streams.append(stream)
        with trio.fail_after(10):  # a whole request still gets through once slots free up
            response = await zenow.client.get("/api/health")
        assert response.status_code == 200

        async def closed_by_server(stream: trio.SocketStream) -> None:
            with trio.fail_after(10):
                while await stream.receive_some(4096):
                    pass

        async with trio.open_nursery() as waiting:
            for stream in streams:
                waiting.start_soon(closed_by_server, stream)
        for stream in streams:
            await stream.aclose()


async def test_a_hundred_hostile_requests_of_every_kind_leave_zenow_serving_and_data_intact(client, zenow):
    sid = (await create_session(client, "keep me"))["session_id"]
    await add_message(client, sid, "user", "precious")
    hostile: list[tuple[str, str, dict]] = [
        ("GET", f"/api/sessions?offset={BIG}", {}),
        ("GET", f"/api/sessions?limit={BIG}", {}),
        ("GET", f"/api/sessions/{sid}/messages?limit={BIG}", {}),
        ("GET", "/api/sessions/99999999999999999999999", {}),
        ("POST", "/api/chat", {"json": {"session_id": BIG, "messages": [{"role": "user", "content": "x"}]}}),
        ("POST", "/api/sessions", raw_json({"first_message": SURROGATE})),
        ("POST", f"/api/sessions/{sid}/messages", raw_json({"role": "user", "content": SURROGATE})),
        ("PUT", f"/api/sessions/{sid}/name", raw_json({"new_name": SURROGATE})),
        ("POST", "/api/models/update_param?mode=llm", raw_json({"system_prompt": SURROGATE})),
        ("POST", "/api/models/update_param?mode=llm", {"json": {"threads": 1024}}),
        ("POST", "/api/models/update_param?mode=llm", {"json": {"context_size": 1_048_576 * 16}}),
        ("POST", "/api/sessions", {"content": b"\xff\xfe\xfd", "headers": {"Content-Type": "application/json"}}),
        ("POST", "/api/sessions", {"content": "[" * 50_000, "headers": {"Content-Type": "application/json"}}),
        ("POST", "/api/sessions", {"content": '{"first_message": "x"}', "headers": {"Content-Type": "text/plain"}}),
        ("POST", "/api/models/load", {"json": {"model_name": "../../etc/passwd", "mode": "llm"}}),
        ("POST", "/api/models/load", {"json": {"model_name": "x", "mode": "nope"}}),
        ("POST", "/api/models/download", {"json": {"url": "file:///etc/passwd", "mode": "llm"}}),
        ("POST", "/api/models/download", {"json": {"url": "http://127.0.0.1:9/x.gguf", "filename": "../x.gguf"}}),
        ("GET", "/api/models/list?mode=%ED%A0%80", {}),
        ("GET", "/api/sessions", {"headers": {"Host": "evil.example"}}),
    ]
    answers: dict[int, int] = {}
    for _ in range(5):
        for method, path, kwargs in hostile:
            response = await client.request(method, path, **kwargs)
            answers[response.status_code] = answers.get(response.status_code, 0) + 1
            assert 400 <= response.status_code < 500, (method, path, response.status_code, response.text)
            assert isinstance(response.json()["detail"], str)
    assert sum(answers.values()) == 100
    await assert_healthy(client)
    session = (await client.get(f"/api/sessions/{sid}")).json()
    assert (session["session_name"], session["message_count"]) == ("keep me", 1)
    messages = (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
    assert [m["content"] for m in messages] == ["precious"]
    assert (await client.get("/api/sessions")).json()["total"] == 1
    connection = sqlite3.connect(zenow.settings.database_path)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        connection.close()

"""API keys, the bind guard and what a key-protected zenow shows to strangers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.support.harness import run_zenow_to_exit, spawn_zenow, start_zenow
from zenow.app import key_accepted, presented_key

KEY = "s3cret-key-for-tests"


@pytest.fixture
async def keyed(nursery, settings):
    async with start_zenow(nursery, replace(settings, api_keys=(KEY, "second-key"))) as zenow:
        yield zenow


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"},
                                     {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}])
async def test_every_route_requires_the_key(keyed, headers):
    for method, path in [("GET", "/api/sessions"), ("GET", "/api/models/list"), ("GET", "/openapi.json"),
                         ("POST", "/api/sessions"), ("GET", "/api/server/status")]:
        response = await keyed.client.request(method, path, headers=headers, json={"first_message": "x"})
        assert response.status_code == 401, (method, path)
        assert "API key" in response.json()["detail"]
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert (await keyed.client.get("/api/sessions", headers={"Authorization": f"Bearer {KEY}"})).json()["total"] == 0


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"},
                                     {"x-api-key": KEY}, {"Authorization": "Bearer second-key"}])
async def test_the_key_opens_every_route(keyed, headers):
    created = await keyed.client.post("/api/sessions", json={"first_message": "hi"}, headers=headers)
    assert created.status_code == 200
    assert (await keyed.client.get("/api/sessions", headers=headers)).json()["total"] == 1


async def test_a_key_in_the_query_counts_only_where_browsers_cannot_send_headers(keyed):
    response = await keyed.client.get("/api/sessions", params={"api_key": KEY})
    assert response.status_code == 401
    assert presented_key({}, "/api/events", {"api_key": KEY}) == KEY
    assert presented_key({}, "/api/sessions", {"api_key": KEY}) is None


async def test_health_answers_without_a_key_but_reveals_nothing_more(keyed):
    anonymous = await keyed.client.get("/api/health")
    assert anonymous.status_code == 200
    assert anonymous.json() == {"status": "healthy", "app": "zenow"}
    known = await keyed.client.get("/api/health", headers={"x-api-key": KEY})
    assert "version" in known.json()


async def test_a_preflight_needs_no_key(keyed):
    response = await keyed.client.options("/api/sessions", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code == 204
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"


async def test_openai_error_shape_for_a_missing_key_on_v1(keyed):
    response = await keyed.client.get("/v1/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_keys_are_compared_against_every_key():
    assert key_accepted("b", ("a", "b"))
    assert not key_accepted("c", ("a", "b"))
    assert not key_accepted(None, ("a",))
    assert not key_accepted("\udcff", ("a",))  # not UTF-8 encodable: refused, no crash


async def test_listening_beyond_loopback_without_a_key_is_refused(tmp_path):
    code, stderr = await run_zenow_to_exit(tmp_path / "home", "--host", "0.0.0.0", "--port", "0")
    assert code == 1
    assert "without an API key" in stderr and "--insecure" in stderr
    assert len(stderr.strip().splitlines()) == 1


async def test_a_key_file_protects_a_real_zenow_and_the_key_is_never_logged(nursery, tmp_path):
    import httpx

    key_file = tmp_path / "keys"
    key_file.write_text(f"# zenow keys\n{KEY}\n")
    running = await spawn_zenow(nursery, tmp_path / "home", "--api-key-file", str(key_file), "--log-level", "DEBUG")
    try:
        async with httpx.AsyncClient(base_url=running.url) as client:
            assert (await client.get("/api/sessions")).status_code == 401
            assert (await client.get("/api/sessions", headers={"x-api-key": KEY})).status_code == 200
            await client.get("/api/sessions", headers={"Authorization": "Bearer wrong-guess"})
    finally:
        running.process.terminate()
        await running.process.wait()
    log = "\n".join(running.log)
    assert "zenow serving" in log
    assert KEY not in log and "wrong-guess" not in log


@pytest.mark.real_llama
async def test_a_child_answers_only_zenow_and_its_key_is_never_on_a_command_line(nursery, tmp_path, llama_server,
                                                                                tiny_models):
    import os
    from pathlib import Path

    import httpx

    from tests.support.harness import make_settings, wait_status
    from tests.support.llama import cmdline, llama_children

    settings = make_settings(tmp_path / "home", llama_server=llama_server, default_llm=tiny_models["llm"])
    async with start_zenow(nursery, settings) as zenow:
        await wait_status(zenow.client, "running", "llm")
        (child,) = llama_children(os.getpid(), "llm")
        argv = cmdline(child)
        port = int(argv[argv.index("--port") + 1])
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        assert not any("api-key" in part for part in argv)
        raw = Path(f"/proc/{child}/environ").read_bytes().decode()
        environ = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
        key = environ["LLAMA_API_KEY"]
        assert len(key) >= 32
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as direct:
            ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            refused = await direct.post("/v1/chat/completions", json=ask)
            assert refused.status_code == 401  # another local user, without the key
            allowed = await direct.post("/v1/chat/completions", json=ask, headers={"Authorization": f"Bearer {key}"})
            assert allowed.status_code == 200
        # zenow itself sends the key: chat, /v1 and token counts work
        sid = (await zenow.client.post("/api/sessions", json={"first_message": "hi"})).json()["session_id"]
        chat = await zenow.client.post("/api/chat", json={"session_id": sid, "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200, chat.text
        v1 = await zenow.client.post("/v1/chat/completions", json={**ask})
        assert v1.status_code == 200, v1.text
        messages = (await zenow.client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
        assert messages[0]["token_count"] > 0

"""A mode served by a remote backend (`backend_url`), against the fake llama-server started
as that remote: a farm without /health and /tokenize, a wrong key, what is refused, and
where the key may never appear.  (tests/test_remote_real.py shows the feature on the real
llama-server.)"""

from __future__ import annotations

import logging
import os
import stat

import pytest
import trio

from tests.support.harness import create_session, make_settings, start_zenow, wait_for, wait_status
from tests.support.llama import FAKE_LLAMA_SERVER, cmdline, fake_events, llama_children
from tests.support.remote import chat_text, fake_argv, remote_server
from zenow.tokens import estimate_tokens

KEY = "remote-key-0123456789"


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path / "home", backend_check_interval=0.2)


async def use_backend(client, mode="llm", **params):
    response = await client.post("/api/models/update_param", params={"mode": mode}, json=params)
    assert response.status_code == 200, response.text
    return response.json()


async def test_a_remote_without_health_and_tokenize_is_checked_by_v1_models_and_counted_by_estimate(
        nursery, settings, event_log):
    async with remote_server(fake_argv(), KEY, FAKE_LLAMA_WITHOUT="/health,/tokenize") as remote, \
            start_zenow(nursery, settings) as zenow:
        client = zenow.client
        assert (await use_backend(client, backend_url=remote.url + "/v1/", backend_api_key=KEY))[
            "requires_restart"] is True
        status = await wait_status(client, "running")
        assert status == {"status": "running", "model_name": "remote-model.gguf", "model_path": remote.url,
                          "is_running": True, "error_message": None, "backend_url": remote.url,
                          "token_counting": "estimate"}
        params = (await client.get("/api/models/get_param", params={"mode": "llm"})).json()
        assert params["backend_url"] == remote.url  # the trailing /v1/ of an OpenAI base URL taken off
        assert params["backend_api_key_set"] is True and "backend_api_key" not in params

        sid = (await create_session(client, "hello"))["session_id"]
        question = "Why is the sky blue? Explain in one sentence."
        async with client.stream("POST", "/api/chat", json={
                "session_id": sid, "stream": True, "messages": [{"role": "user", "content": question}]}) as response:
            assert response.status_code == 200
            reply = chat_text((await response.aread()).decode())
        assert reply == "Hello from the fake server."
        stored = (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
        assert [(m["role"], m["content"]) for m in stored] == [("user", question), ("assistant", reply)]
        assert stored[0]["token_count"] == estimate_tokens(question)

    requests = fake_events(event_log, "request")
    paths = [r["path"] for r in requests]
    first = paths.index("/health")  # answered 404 once: /v1/models from then on
    assert paths[first + 1] == "/v1/models" and paths.count("/health") == 1
    assert paths.count("/tokenize") == 1  # the probe only, never a count
    (chat,) = [r for r in requests if r["path"] == "/v1/chat/completions"]
    assert chat["body"]["model"] == "remote-model.gguf"  # a farm is told which model


async def test_a_wrong_key_is_an_error_saying_so_and_the_right_one_fixes_it(nursery, settings):
    async with remote_server(fake_argv(), KEY) as remote, start_zenow(nursery, settings) as zenow:
        client = zenow.client
        await use_backend(client, backend_url=remote.url, backend_api_key="not-the-key")
        status = await wait_status(client, "error")
        assert "refused the key" in status["error_message"] and remote.url in status["error_message"]
        assert status["backend_url"] == remote.url
        sid = (await create_session(client))["session_id"]
        refused = await client.post("/api/chat", json={"session_id": sid, "messages": [
            {"role": "user", "content": "hi"}]})
        assert refused.status_code == 503 and "refused the key" in refused.json()["detail"]
        v1 = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert v1.status_code == 503 and v1.json()["error"]["code"] == "backend_unavailable"

        assert (await use_backend(client, backend_api_key=KEY))["requires_restart"] is True
        status = await wait_status(client, "running")
        assert status["token_counting"] == "tokenize"
        answer = await client.post("/api/chat", json={"session_id": sid, "stream": False,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text


async def test_bad_backend_parameters_are_refused_naming_the_field(nursery, settings):
    async with start_zenow(nursery, settings) as zenow:
        client = zenow.client
        for url, said in [("ftp://host/x", "http"), ("http://", "http"), ("not a url", "http"),
                          ("http://host:99999", "valid URL"), ("http://host/?q=1", "query"),
                          ("http://user:hunter2@host:8080", "credentials")]:
            response = await client.post("/api/models/update_param", params={"mode": "llm"},
                                         json={"backend_url": url})
            assert response.status_code == 400, url
            detail = response.json()["detail"]
            assert detail.startswith("backend_url:") and said in detail, detail
            assert "hunter2" not in detail
        for key in ["two\nlines", 42, " spaced", "x" * 5000]:
            response = await client.post("/api/models/update_param", params={"mode": "llm"},
                                         json={"backend_api_key": key})
            assert response.status_code == 400, key
            detail = response.json()["detail"]
            assert detail.startswith("backend_api_key:") and "two" not in detail and "xxxx" not in detail
        params = (await client.get("/api/models/get_param", params={"mode": "llm"})).json()
        assert params["backend_url"] == "" and params["backend_api_key_set"] is False
        assert (await wait_status(client, "not_started"))["model_path"] is None


async def test_the_key_is_kept_in_a_private_file_and_never_shown(nursery, settings, caplog):
    caplog.set_level(logging.DEBUG)
    events: list[str] = []
    async with remote_server(fake_argv(), KEY) as remote, start_zenow(nursery, settings) as zenow:
        client = zenow.client

        async def listen() -> None:
            async with client.stream("GET", "/api/events") as response:
                async for line in response.aiter_lines():
                    events.append(line)

        listening, stopped = trio.CancelScope(), trio.Event()

        async def listen_until_cancelled() -> None:
            try:
                with listening:
                    await listen()
            finally:
                stopped.set()

        nursery.start_soon(listen_until_cancelled)
        await wait_for(lambda: _true(events), what="the events' snapshot")
        answer = await use_backend(client, backend_url=remote.url, backend_api_key=KEY, backend_model="farm-7b")
        assert KEY not in str(answer)
        status = await wait_status(client, "running")
        assert status["model_name"] == "farm-7b"
        params = (await client.get("/api/models/get_param", params={"mode": "llm"})).json()
        assert params["backend_model"] == "farm-7b" and params["backend_api_key_set"] is True
        shown = [str(params), str(status), (await client.get("/openapi.json")).text]
        await wait_for(lambda: _true([e for e in events if '"backend_url"' in e and "running" in e]),
                       what="the status event of the backend")

        key_file = settings.home / "secrets" / "backend-llm.key"
        assert key_file.read_text().strip() == KEY
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700

        # a key-only update keeps the URL; clearing it deletes the file
        assert (await use_backend(client, backend_api_key=None))["requires_restart"] is True
        assert not key_file.exists()
        params = (await client.get("/api/models/get_param", params={"mode": "llm"})).json()
        assert params["backend_api_key_set"] is False and params["backend_url"] == remote.url
        assert "refused the key" in (await wait_status(client, "error"))["error_message"]
        listening.cancel()
        await stopped.wait()  # before the client closes: a read on its closed socket is an error, not a cancel
    database = (settings.home / "zenow.db").read_bytes() + b"".join(
        p.read_bytes() for p in settings.home.glob("zenow.db-*"))
    assert KEY.encode() not in database
    assert not any(KEY in text for text in [*shown, *events, *(r.getMessage() for r in caplog.records)])
    assert not any(KEY in p.read_text(errors="replace") for p in settings.logs_dir.glob("*"))


async def _true(items: list) -> bool:
    return bool(items)


async def test_a_backend_replaces_the_child_refuses_loads_and_clearing_it_starts_the_child_again(
        nursery, tmp_path, tiny_models):
    settings = make_settings(tmp_path / "home", backend_check_interval=0.2, default_llm=tiny_models["llm"],
                             llama_server=str(FAKE_LLAMA_SERVER))
    async with remote_server(fake_argv(), KEY) as remote, start_zenow(nursery, settings) as zenow:
        client = zenow.client
        local = await wait_status(client, "running")
        assert local["model_path"] == str(tiny_models["llm"]) and "backend_url" not in local
        assert len(local_children()) == 1

        await use_backend(client, backend_url=remote.url, backend_api_key=KEY)
        assert (await wait_status(client, "running"))["backend_url"] == remote.url
        assert local_children() == []  # the local child was stopped and reaped
        response = await client.post("/api/models/load", json={"model_name": "tiny-llama", "mode": "llm"})
        assert response.status_code == 409
        assert remote.url in response.json()["detail"] and "backend_url" in response.json()["detail"]

        assert (await use_backend(client, backend_url=""))["requires_restart"] is True
        local = await wait_status(client, "running")
        assert local["model_path"] == str(tiny_models["llm"]) and "backend_url" not in local
        assert len(local_children()) == 1
        sid = (await create_session(client))["session_id"]
        answer = await client.post("/api/chat", json={"session_id": sid, "stream": False,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        assert answer.status_code == 200, answer.text


def local_children() -> list[int]:
    """zenow's llama-server children (the remote the test started has `--api-key` on its command line)."""
    return [pid for pid in llama_children(os.getpid()) if "--api-key" not in cmdline(pid)]


async def test_a_remote_embed_mode_answers_v1_embeddings(nursery, settings, event_log):
    async with remote_server(fake_argv("remote-embedder.gguf", "--embedding"), KEY) as remote, \
            start_zenow(nursery, settings) as zenow:
        client = zenow.client
        await use_backend(client, "embed", backend_url=remote.url, backend_api_key=KEY)
        await wait_status(client, "running", "embed")
        response = await client.post("/v1/embeddings", json={"input": ["a cat", "a dog"]})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["model"] == "remote-embedder.gguf" and len(answer["data"]) == 2
        assert len(answer["data"][0]["embedding"]) == 8
        listed = (await client.get("/v1/models")).json()["data"]
        assert {"id": "remote-embedder.gguf", "mode": "embed", "running": True}.items() <= listed[-1].items()
    (sent,) = [r for r in fake_events(event_log, "request") if r["path"] == "/v1/embeddings"]
    assert sent["body"]["model"] == "remote-embedder.gguf" and sent["body"]["input"] == ["a cat", "a dog"]


async def health_checks_pass(event_log, more: int) -> None:
    """Return once the remote has had `more` health checks from now: the server actor went
    round its loop that often, so whatever it would have done meanwhile, it did."""
    def checks() -> int:
        return sum(e["path"] == "/health" for e in fake_events(event_log, "request"))

    start = checks()

    async def enough() -> bool:
        return checks() >= start + more

    await wait_for(enough, what=f"{more} more health checks of the remote")


async def test_a_backend_set_before_a_restart_is_served_again_without_a_child(nursery, tmp_path, tiny_models,
                                                                               event_log):
    home = tmp_path / "home"
    async with remote_server(fake_argv(), KEY) as remote:
        settings = make_settings(home, backend_check_interval=0.2, default_llm=tiny_models["llm"],
                                 llama_server=str(FAKE_LLAMA_SERVER))
        async with start_zenow(nursery, settings) as zenow:
            await use_backend(zenow.client, backend_url=remote.url, backend_api_key=KEY)
            await wait_status(zenow.client, "running")
        async with start_zenow(nursery, settings) as zenow:
            status = await wait_status(zenow.client, "running")
            assert status["backend_url"] == remote.url
            await health_checks_pass(event_log, 3)
            assert local_children() == []


async def test_keep_alive_never_stops_a_remote_backend(nursery, settings, event_log):
    # Idle unload stops zenow's own children; a backend is not zenow's to stop, and /metrics
    # does not scrape it as one of zenow's llama-servers.
    async with remote_server(fake_argv(), KEY) as remote, start_zenow(nursery, settings) as zenow:
        client = zenow.client
        await use_backend(client, backend_url=remote.url, backend_api_key=KEY, keep_alive=1)
        await wait_status(client, "running")
        await health_checks_pass(event_log, 15)  # 3 s of checks every 0.2 s: well past keep_alive
        status = (await client.get("/api/server/status", params={"mode": "llm"})).json()
        assert status["status"] == "running" and "reason" not in status
        scrape = (await client.get("/metrics")).text
        assert 'zenow_llama_server_metrics_up{mode="llm"} 0.0' in scrape

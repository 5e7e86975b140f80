"""Live events with the real llama-server: a model loading, seen over a WebSocket, and chat
throughput with a subscriber that stopped reading."""

from __future__ import annotations

import json
import shutil
from functools import partial

import pytest
import trio
from trio_websocket import open_websocket_url

import zenow.events
import zenow.service
from tests.support.harness import add_message, create_session, make_settings, start_zenow, wait_for, wait_status
from tests.test_events import _stalled_subscriber, subscribed, ws_url
from zenow.events import EventHub

pytestmark = pytest.mark.real_llama



async def test_a_loading_model_is_seen_starting_then_running(nursery, tmp_path, llama_server, smollm2):
    home = tmp_path / "home"
    (home / "models" / "llm").mkdir(parents=True)
    shutil.copy(smollm2, home / "models" / "llm" / "smol.gguf")
    async with start_zenow(nursery, make_settings(home, llama_server=llama_server)) as zenow, \
            open_websocket_url(ws_url(zenow, "?types=status")) as ws:
        snapshot = json.loads(await ws.get_message())
        assert snapshot["servers"]["llm"]["status"] == "not_started"
        async with trio.open_nursery() as loading:
            loading.start_soon(partial(zenow.client.post, "/api/models/load", json={"model_name": "smol"}))
            seen = []
            with trio.fail_after(30):
                while not seen or seen[-1]["status"] != "running":
                    seen.append(json.loads(await ws.get_message()))
    assert [(e["type"], e["mode"], e["status"]) for e in seen] == [("status", "llm", "starting"),
                                                                   ("status", "llm", "running")]
    assert seen[0]["model_name"] == seen[1]["model_name"] == "smol"
    assert seen[1]["is_running"] is True and seen[1]["model_path"] == str(home / "models" / "llm" / "smol.gguf")


async def _timed_chat(client, session_id: int) -> tuple[float, str]:
    started = trio.current_time()
    response = await client.post("/api/chat", json={
        "session_id": session_id, "temperature": 0, "max_tokens": 48,
        "messages": [{"role": "user", "content": "Name three colours."}]})
    assert response.status_code == 200, response.text
    return trio.current_time() - started, response.json()["choices"][0]["message"]["content"]


async def test_chat_is_as_fast_with_a_subscriber_that_stopped_reading(nursery, tmp_path, llama_server, smollm2,
                                                                      monkeypatch):
    hubs: list[EventHub] = []

    class RecordingHub(EventHub):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            hubs.append(self)

    monkeypatch.setattr(zenow.service, "EventHub", RecordingHub)
    monkeypatch.setattr(zenow.events, "SUBSCRIBER_BUFFER", 8)
    settings = make_settings(tmp_path / "home", llama_server=llama_server, default_llm=smollm2)
    async with start_zenow(nursery, settings) as running:
        (hub,) = hubs
        client = running.client
        await wait_status(client, "running")
        await _timed_chat(client, (await create_session(client))["session_id"])  # warm up
        baseline, expected = await _timed_chat(client, (await create_session(client))["session_id"])

        port = int(running.url.rsplit(":", 1)[1])
        dropped = await trio.to_thread.run_sync(_stalled_subscriber, port)
        stalled = None
        try:
            async with subscribed(client, types="session") as (reader, _):
                flood = (await create_session(client))["session_id"]
                await reader.next()
                while hub.dropped == 0:  # the first stalled subscriber fills up and is dropped
                    await add_message(client, flood, "user", "many words " * 24_000)
                    await reader.next()
                stalled = await trio.to_thread.run_sync(_stalled_subscriber, port)  # and another starts stalling
                await wait_for(lambda: _is(hub.subscribers == 2), timeout=5, what="the second stalled subscriber")

                sid = (await create_session(client))["session_id"]
                await reader.next()
                elapsed, text = await _timed_chat(client, sid)
                turns = [await reader.next(), await reader.next()]
        finally:
            dropped.close()
            if stalled is not None:
                stalled.close()
    assert text == expected
    assert elapsed < baseline * 2 + 1.0, (elapsed, baseline)  # loose: the machine may be busy; a block would hang
    assert [(t["type"], t["message"]["role"]) for t in turns] == [("session.message", "user"),
                                                                  ("session.message", "assistant")]
    assert turns[1]["message"]["content"] == text


async def _is(value: bool) -> bool:
    return value

"""Parallel slots: chats on different sessions generate at once; chats on one session never interleave.

The fake llama-server honours `-np` as the real one does: at most that many chat
completions generate at once, the others wait for a slot.  Nothing here is timed:
each test checks the order in which things happened.
"""

from __future__ import annotations

import json
import os

import pytest
import trio

from tests.support.harness import make_settings, start_zenow
from tests.support.llama import FAKE_LLAMA_SERVER, cmdline, llama_children
from tests.support.tiny_models import write_stub_model


@pytest.fixture
def event_log(tmp_path, monkeypatch):
    path = tmp_path / "fake-events.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_EVENT_LOG", str(path))
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "30")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.03")
    return path


def events(path, kind=None):
    found = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return [e for e in found if kind is None or e["event"] == kind]


def start(nursery, tmp_path):
    home = tmp_path / "home"
    write_stub_model(home / "models" / "llm" / "fake.gguf")
    return start_zenow(nursery, make_settings(home, llama_server=str(FAKE_LLAMA_SERVER)))


async def load(client, **params):
    if params:
        assert (await client.post("/api/models/update_param", json=params)).status_code == 200
    assert (await client.post("/api/models/load", json={"model_name": "fake"})).status_code == 200


async def new_session(client) -> int:
    return (await client.post("/api/sessions", json={"first_message": "hi"})).json()["session_id"]


async def chat_recording(client, sid, text, log, name):
    """Stream one chat; append (name, "first") at its first delta and (name, "end") at [DONE]."""
    body = {"session_id": sid, "stream": True, "messages": [{"role": "user", "content": text}]}
    async with client.stream("POST", "/api/chat", json=body) as response:
        assert response.status_code == 200
        first = True
        async for line in response.aiter_lines():
            if line.startswith("data: {") and first:
                log.append((name, "first"))
                first = False
            if line == "data: [DONE]":
                log.append((name, "end"))


async def test_the_llm_server_gets_parallel_slots_of_one_context_each(nursery, tmp_path, event_log):
    async with start(nursery, tmp_path) as zenow:
        await load(zenow.client, context_size=1024)
        (child,) = llama_children(os.getpid())
        argv = cmdline(child)
        assert argv[argv.index("-np") + 1] == "4"  # the default
        assert argv[argv.index("-c") + 1] == str(4 * 1024)  # each conversation gets context_size
        answer = await zenow.client.post("/api/models/update_param", json={"parallel": 2})
        assert answer.json()["requires_restart"] is True
        (child,) = llama_children(os.getpid())
        argv = cmdline(child)
        assert (argv[argv.index("-np") + 1], argv[argv.index("-c") + 1]) == ("2", "2048")


async def test_with_four_slots_four_chats_all_start_before_any_finishes(nursery, tmp_path, event_log):
    async with start(nursery, tmp_path) as zenow:
        await load(zenow.client)  # parallel 4 by default
        sessions = [await new_session(zenow.client) for _ in range(4)]
        log: list[tuple[int, str]] = []
        async with trio.open_nursery() as chats:
            for n, sid in enumerate(sessions):
                chats.start_soon(chat_recording, zenow.client, sid, f"question {n}", log, n)
        kinds = [kind for _, kind in log]
        assert sorted(name for name, kind in log if kind == "end") == [0, 1, 2, 3]
        assert kinds[:4] == ["first"] * 4, log  # every chat had its first token before any ended


async def test_with_one_slot_the_fake_serves_chats_one_after_another(nursery, tmp_path, event_log):
    """The control for the test above: the fake's slots are real, so overlap is zenow's doing."""
    async with start(nursery, tmp_path) as zenow:
        await load(zenow.client, parallel=1)
        sessions = [await new_session(zenow.client) for _ in range(3)]
        log: list[tuple[int, str]] = []
        async with trio.open_nursery() as chats:
            for n, sid in enumerate(sessions):
                chats.start_soon(chat_recording, zenow.client, sid, f"question {n}", log, n)
        starts = [i for i, (_, kind) in enumerate(log) if kind == "first"]
        ends = [i for i, (_, kind) in enumerate(log) if kind == "end"]
        assert starts[1] > ends[0] and starts[2] > ends[1], log


async def test_chats_on_one_session_never_interleave_even_with_free_slots(nursery, tmp_path, event_log):
    async with start(nursery, tmp_path) as zenow:
        await load(zenow.client)
        sid = await new_session(zenow.client)
        log: list[tuple[int, str]] = []
        async with trio.open_nursery() as chats:
            for n in range(4):
                chats.start_soon(chat_recording, zenow.client, sid, f"question {n}", log, n)
                await trio.lowlevel.checkpoint()
        # each chat ran from its first token to its end before the next one started
        assert [kind for _, kind in log] == ["first", "end"] * 4, log
        assert [name for name, _ in log[::2]] == [name for name, _ in log[1::2]]
        messages = (await zenow.client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 4
        order = [name for name, _ in log[::2]]
        assert [m["content"] for m in messages[::2]] == [f"question {n}" for n in order]
        # and each saw the turns before it: the k-th prompt holds the k earlier exchanges
        prompts = [e["body"]["messages"] for e in events(event_log, "request") if e["path"] == "/v1/chat/completions"]
        assert [len(p) for p in prompts] == [2, 4, 6, 8]  # system + history + the question
        requests = [e for e in events(event_log) if e["event"] in ("request", "stream_finished")
                    and (e["event"] == "stream_finished" or e["path"] == "/v1/chat/completions")]
        assert [e["event"] for e in requests] == ["request", "stream_finished"] * 4

"""/v1 when things go wrong, with the fake llama-server: disconnects, crashes, refusals, and a
switch that must not cut a stream in flight."""

from __future__ import annotations

import functools
import json
import shutil
import time
from contextlib import asynccontextmanager, suppress

import httpx
import pytest
import trio

from tests.support.harness import make_settings, start_zenow, wait_for
from tests.support.llama import FAKE_LLAMA_SERVER
from tests.support.llama import fake_events as events
from tests.support.raw_http import STREAM_HEAD, read_request

FAKE_REPLY = "Hello from the fake server."
ASK = {"model": "fake-a", "messages": [{"role": "user", "content": "hello there"}]}


async def first(path, kind):
    found = events(path, kind)
    return found[0] if found else None


@asynccontextmanager
async def fake_zenow(nursery, tmp_path, model_file):
    """zenow over the fake llama-server with llm models fake-a and fake-b registered, none running
    (both copies of `model_file`, a real GGUF file that the fake never reads).

    The fake takes its FAKE_LLAMA_* knobs from the environment when it is spawned, so a test
    sets them (monkeypatch) before the first request loads a model."""
    home = tmp_path / "home"
    (home / "models" / "llm").mkdir(parents=True)
    for name in ("fake-a", "fake-b"):
        shutil.copy(model_file, home / "models" / "llm" / f"{name}.gguf")
    async with start_zenow(nursery, make_settings(home, llama_server=str(FAKE_LLAMA_SERVER))) as zenow:
        yield zenow


def frames(raw: str) -> list:
    """The events of an SSE body; asserts each is a whole `data:` event."""
    assert raw.endswith("\n\n")
    parts = raw.split("\n\n")[:-1]
    assert all(p.startswith("data: ") and "\n" not in p for p in parts)
    return [p[6:] if p == "data: [DONE]" else json.loads(p[6:]) for p in parts]


async def test_a_client_disconnect_mid_stream_stops_generation_upstream_at_once(
        nursery, tmp_path, tiny_models, monkeypatch, event_log,
):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.05")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "400")
    async with fake_zenow(nursery, tmp_path, tiny_models["llm"]) as zenow:
        received = []
        async with zenow.client.stream("POST", "/v1/chat/completions", json={**ASK, "stream": True}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    if delta.get("content"):
                        received.append(delta["content"])
                if len(received) == 5:
                    break
            closed_at = time.time()
        gone = await wait_for(lambda: first(event_log, "client_disconnected"), timeout=5, what="upstream disconnect")
        assert gone["time"] - closed_at < 0.1, f"generation went on for {gone['time'] - closed_at:.3f} s"
        assert gone["stream"] is True and gone["tokens_sent"] < 400


async def test_a_client_gone_right_after_the_headers_stops_generation_too(
        nursery, tmp_path, tiny_models, monkeypatch, event_log,
):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.05")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "400")
    async with fake_zenow(nursery, tmp_path, tiny_models["llm"]) as zenow:
        async with zenow.client.stream("POST", "/v1/chat/completions", json={**ASK, "stream": True}) as response:
            assert response.status_code == 200
            closed_at = time.time()
        gone = await wait_for(lambda: first(event_log, "client_disconnected"), timeout=5, what="upstream disconnect")
        assert gone["time"] - closed_at < 0.1 and gone["tokens_sent"] < 10


async def test_a_client_gone_during_a_whole_answer_stops_generation_upstream(
        nursery, tmp_path, tiny_models, monkeypatch, event_log,
):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.05")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "400")
    async with fake_zenow(nursery, tmp_path, tiny_models["llm"]) as zenow:
        await zenow.client.post("/api/models/load", json={"model_name": "fake-a"})
        async with httpx.AsyncClient(base_url=zenow.url, timeout=0.5) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post("/v1/chat/completions", json=ASK)
            closed_at = time.time()
        gone = await wait_for(lambda: first(event_log, "client_disconnected"), timeout=5, what="upstream disconnect")
        assert gone["stream"] is False and gone["time"] - closed_at < 0.1


async def test_a_crash_mid_stream_ends_with_an_error_event_then_done(nursery, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_CRASH_MID_STREAM", "3")
    async with (fake_zenow(nursery, tmp_path, tiny_models["llm"]) as zenow,
                zenow.client.stream("POST", "/v1/chat/completions", json={**ASK, "stream": True}) as response):
        assert response.status_code == 200
        raw = "".join([text async for text in response.aiter_text()])
    events_ = frames(raw)
    assert events_[-1] == "[DONE]"
    error = events_[-2]["error"]
    assert error["type"] == "server_error" and error["code"] == "upstream_error" and "llama-server" in error["message"]
    deltas = [e["choices"][0]["delta"].get("content") for e in events_[:-2]]
    assert "".join(d for d in deltas if d) == "Hello from the"
    assert all(e["model"] == "fake-a" for e in events_[:-2])


async def test_a_crash_during_a_whole_answer_is_a_502(nursery, tmp_path, tiny_models, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_CRASH_MID_STREAM", "2")
    async with fake_zenow(nursery, tmp_path, tiny_models["llm"]) as zenow:
        answer = await zenow.client.post("/v1/chat/completions", json=ASK)
    assert answer.status_code == 502
    assert answer.json()["error"]["type"] == "api_error" and answer.json()["error"]["code"] == "upstream_error"


async def test_a_prompt_too_long_for_the_context_is_a_400_naming_messages(nursery, tmp_path, tiny_models):
    async with fake_zenow(nursery, tmp_path, tiny_models["llm"]) as zenow:
        assert (await zenow.client.post("/api/models/load", json={"model_name": "fake-a"})).status_code == 200
        assert (await zenow.client.post("/api/models/update_param", json={"context_size": 64})).status_code == 200
        long = {**ASK, "messages": [{"role": "user", "content": "word " * 500}]}
        for stream in (False, True):
            answer = await zenow.client.post("/v1/chat/completions", json={**long, "stream": stream})
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["param"] == "messages"
            assert answer.json()["error"]["code"] == "context_length_exceeded"


async def test_a_switch_waits_for_the_stream_in_flight_and_never_cuts_it(
        nursery, tmp_path, tiny_models, monkeypatch, event_log,
):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.02")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "30")
    async with fake_zenow(nursery, tmp_path, tiny_models["llm"]) as zenow:
        streamed = {}
        switched = {}

        async def stream_from_a(task_status=trio.TASK_STATUS_IGNORED):
            async with zenow.client.stream("POST", "/v1/chat/completions", json={**ASK, "stream": True}) as response:
                task_status.started()
                streamed["raw"] = "".join([text async for text in response.aiter_text()])
                streamed["ended"] = time.time()

        async def ask_b():
            answer = await zenow.client.post("/v1/chat/completions", json={**ASK, "model": "fake-b"})
            switched["answer"] = answer
            switched["ended"] = time.time()

        async with trio.open_nursery() as both:
            await both.start(stream_from_a)
            both.start_soon(ask_b)
    events_ = frames(streamed["raw"])
    assert events_[-1] == "[DONE]" and "error" not in events_[-2]
    assert len([e for e in events_[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")]) == 30
    assert switched["answer"].status_code == 200, switched["answer"].text
    assert switched["answer"].json()["model"] == "fake-b"
    finished = events(event_log, "stream_finished")
    started = [e for e in events(event_log, "listening")]
    assert len(started) == 2 and finished[0]["time"] < started[1]["time"]  # b started only after a's stream ended


async def test_a_switch_waits_for_an_api_chat_stream_and_never_cuts_it(
        nursery, tmp_path, tiny_models, monkeypatch, event_log,
):
    """A session's /api/chat stream holds the running model too: /v1 naming another model waits."""
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.02")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "30")
    async with fake_zenow(nursery, tmp_path, tiny_models["llm"]) as zenow:
        loaded = await zenow.client.post("/api/models/load", json={"model_name": "fake-a", "mode": "llm"})
        assert loaded.status_code == 200, loaded.text
        sid = (await zenow.client.post("/api/sessions", json={"first_message": "hi"})).json()["session_id"]
        streamed = {}
        switched = {}

        async def chat_on_a(task_status=trio.TASK_STATUS_IGNORED):
            body = {"session_id": sid, "stream": True, "messages": [{"role": "user", "content": "hello there"}]}
            async with zenow.client.stream("POST", "/api/chat", json=body) as response:
                task_status.started()
                streamed["raw"] = "".join([text async for text in response.aiter_text()])

        async def ask_b():
            switched["answer"] = await zenow.client.post("/v1/chat/completions", json={**ASK, "model": "fake-b"})

        async with trio.open_nursery() as both:
            await both.start(chat_on_a)
            await wait_for(lambda: first(event_log, "token_sent"), what="the chat to start streaming")
            both.start_soon(ask_b)
        messages = (await zenow.client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
    events_ = frames(streamed["raw"])
    assert events_[-1] == "[DONE]" and all("error" not in e for e in events_[:-1])
    assert len(events_) == 31  # 30 deltas, whole
    assert switched["answer"].status_code == 200, switched["answer"].text
    assert switched["answer"].json()["model"] == "fake-b"
    assert [m["role"] for m in messages] == ["user", "assistant"]
    finished = events(event_log, "stream_finished")
    started = events(event_log, "listening")
    assert len(started) == 2 and finished[0]["time"] < started[1]["time"]  # b started only after the chat ended


async def test_a_lagging_v1_reader_gets_every_waiting_event_in_one_chunk_ending_at_done():
    from zenow.v1._gateway import CompletionStream
    from zenow.v1._shapes import DONE

    send, receive = trio.open_memory_channel[bytes](32)
    frames = CompletionStream(receive, trio.CancelScope()).frames()
    waiting = [b'data: {"n":%d}\n\n' % i for i in range(5)]
    for frame in waiting:
        send.send_nowait(frame)
    assert await frames.__anext__() == b"".join(waiting)  # all of them, in order, at once
    send.send_nowait(b'data: {"n":5}\n\n')
    send.send_nowait(DONE)
    send.send_nowait(b'data: {"after":"done"}\n\n')  # never sent: the stream ends at DONE
    assert await frames.__anext__() == b'data: {"n":5}\n\n' + DONE
    assert [chunk async for chunk in frames] == []


@pytest.mark.parametrize(("body", "expected"), [
    (b'data: {"choices":[{"delta":{"content":"a"},"index":0}]}\n\ndata: [1]\n\n', "a chunk that is not an object"),
    (b'data: {"error":{"message":"boom"}}\n\n', "llama-server failed: boom"),
    (b"data: " + b"x" * (1 << 20) + b"x", "a line longer than"),
    (b'data: {"choices":[{"delta":{"content":"a"},"index":0}]}\n\n', "ended the stream without [DONE]"),
])
async def test_a_broken_stream_ends_with_an_error_event_then_done_whatever_came_before(nursery, body, expected):
    """The /v1 stream reader against a server (a raw socket) that answers 200 with a stream that goes
    wrong: what was whole is passed on, then one error event naming the fault, then DONE."""
    from zenow.servers import upstream_client
    from zenow.v1._actor import ChatStreamCall, _stream_chat

    async def serve(stream):
        async with stream:
            await read_request(stream)
            await stream.send_all(STREAM_HEAD)
            with suppress(trio.BrokenResourceError):  # the client may stop reading an endless line
                for start in range(0, len(body), 4096):  # many reads: the endless line grows across them
                    await stream.send_all(body[start:start + 4096])

    (listener,) = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    send, receive = trio.open_memory_channel(1000)
    started_send, started = trio.open_memory_channel(1)
    async with upstream_client(httpx.Timeout(10.0)) as http:
        await _stream_chat(http, ChatStreamCall(f"http://127.0.0.1:{port}/v1/chat/completions", {}, "smol"),
                           send, started_send)
    assert started.receive_nowait().unwrap() is None
    sent = [receive.receive_nowait() for _ in range(receive.statistics().current_buffer_used)]
    assert sent[-1] == b"data: [DONE]\n\n"
    error = json.loads(sent[-2][6:])["error"]
    assert expected in error["message"] and error["code"] == "upstream_error"
    passed = [json.loads(frame[6:]) for frame in sent[:-2]]
    assert [c["choices"][0]["delta"]["content"] for c in passed] == (["a"] if b'"content":"a"' in body else [])
    assert all(c["model"] == "smol" for c in passed)

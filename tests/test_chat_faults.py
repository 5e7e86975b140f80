"""/api/chat validation, interruption and ordering, with the fake llama-server."""

from __future__ import annotations

import json
import time

import pytest
import trio

from tests.support.harness import make_settings, respawn, start_zenow, wait_for
from tests.support.llama import FAKE_LLAMA_SERVER
from tests.support.llama import fake_events as events
from tests.support.tiny_models import write_stub_model
from zenow.chat import Turn, history_in_steps


@pytest.fixture
async def fake(nursery, tmp_path, event_log):
    home = tmp_path / "home"
    write_stub_model(home / "models" / "llm" / "fake.gguf")
    settings = make_settings(home, llama_server=str(FAKE_LLAMA_SERVER))
    async with start_zenow(nursery, settings) as zenow:
        assert (await zenow.client.post("/api/models/load", json={"model_name": "fake"})).status_code == 200
        yield zenow


async def session(client):
    return (await client.post("/api/sessions", json={"first_message": "hi"})).json()["session_id"]


async def stored(client, sid):
    return (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]


def ask(sid, text="hello there", **extra):
    return {"session_id": sid, "stream": True, "messages": [{"role": "user", "content": text}], **extra}


async def test_a_client_disconnect_stops_generation_upstream_at_once(fake, monkeypatch, event_log):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.05")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "400")
    await respawn(fake)
    sid = await session(fake.client)
    received = []
    async with fake.client.stream("POST", "/api/chat", json=ask(sid)) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                received.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
            if len(received) == 5:
                break
        closed_at = time.time()
    gone = await wait_for(lambda: _first(event_log, "client_disconnected"), timeout=5, what="upstream disconnect")
    assert gone["time"] - closed_at < 0.1, f"generation went on for {gone['time'] - closed_at:.3f} s"
    assert gone["tokens_sent"] < 400

    async def saved():
        messages = await stored(fake.client, sid)
        return messages if len(messages) == 2 else None

    user, partial = await wait_for(saved, timeout=5, what="the partial reply to be saved")
    assert user["content"] == "hello there"
    assert partial["role"] == "assistant" and partial["content"].startswith("".join(received))
    assert len(partial["content"]) < len("Hello from the fake server." * 70)


async def _first(path, kind):
    found = events(path, kind)
    return found[0] if found else None


async def test_a_crash_mid_stream_gives_an_error_event_and_keeps_the_partial_reply(fake, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_CRASH_MID_STREAM", "3")
    await respawn(fake)
    sid = await session(fake.client)
    async with fake.client.stream("POST", "/api/chat", json=ask(sid)) as response:
        raw = "".join([chunk async for chunk in response.aiter_text()])
    frames = [json.loads(f[6:]) if f != "data: [DONE]" else "[DONE]" for f in raw.split("\n\n")[:-1]]
    assert frames[-1] == "[DONE]" and "llama-server" in frames[-2]["error"]
    deltas = [f["choices"][0]["delta"]["content"] for f in frames[:-2]]
    assert 3 <= len(deltas) < 6 and "".join(deltas).startswith("Hello from the")
    messages = await stored(fake.client, sid)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"] == "".join(deltas)


async def test_two_chats_on_one_session_come_out_in_order(fake, monkeypatch, event_log):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.02")
    await respawn(fake)
    sid = await session(fake.client)
    bodies = {}

    async def chat(text):
        async with fake.client.stream("POST", "/api/chat", json=ask(sid, text)) as response:
            bodies[text] = "".join([chunk async for chunk in response.aiter_text()])

    async with trio.open_nursery() as both:
        both.start_soon(chat, "first question")
        await trio.sleep(0.01)
        both.start_soon(chat, "second question")
    assert all(body.endswith("data: [DONE]\n\n") for body in bodies.values())
    messages = await stored(fake.client, sid)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "first question"), ("assistant", "Hello from the fake server."),
        ("user", "second question"), ("assistant", "Hello from the fake server."),
    ]
    prompts = [e["body"]["messages"] for e in events(event_log, "request") if e["path"] == "/v1/chat/completions"]
    assert [m["content"] for m in prompts[1]][1:] == [
        "first question", "Hello from the fake server.", "second question"]


async def test_the_prompt_is_system_history_then_request_with_chosen_options(fake, event_log):
    sid = await session(fake.client)
    await fake.client.post("/api/models/update_param", json={"system_prompt": "Be terse.", "temperature": 0.3})
    await fake.client.post("/api/chat", json={**ask(sid, "one"), "stream": False})
    answer = await fake.client.post("/api/chat", json={**ask(sid, "two"), "stream": False, "max_tokens": 2,
                                                       "repeat_penalty": 1.5})
    body = answer.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello from"}
    assert body["choices"][0]["finish_reason"] == "length" and body["session_id"] == sid
    sent = [e["body"] for e in events(event_log, "request") if e["path"] == "/v1/chat/completions"][-1]
    assert sent["messages"] == [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Hello from the fake server."}, {"role": "user", "content": "two"},
    ]
    assert (sent["temperature"], sent["repeat_penalty"], sent["max_tokens"]) == (0.3, 1.5, 2)


async def test_history_takes_whole_newest_messages_within_half_the_context(fake, event_log):
    client = fake.client
    await client.post("/api/models/update_param", json={"context_size": 128})
    sid = await session(client)
    for i in range(40):
        await client.post(f"/api/sessions/{sid}/messages", json={"role": "user", "content": f"question number {i}"})
        await client.post(f"/api/sessions/{sid}/messages", json={"role": "assistant", "content": f"answer {i} is {i}"})
    history = await stored(client, sid)
    system = (await client.get("/api/models/get_param")).json()["system_prompt"]
    system_tokens = len(system.split())  # the fake counts one token per word
    newest_first = [Turn(m["role"], m["content"], m["token_count"]) for m in reversed(history)]
    total = sum(m["token_count"] for m in history)
    expected = history_in_steps(64 - system_tokens, total, newest_first)
    await client.post("/api/chat", json={**ask(sid, "now"), "stream": False})
    sent = [e["body"] for e in events(event_log, "request") if e["path"] == "/v1/chat/completions"][-1]["messages"]
    assert sent[1:-1] == [{"role": t.role, "content": t.content} for t in expected]
    assert sent[1]["role"] == "user" and 0 < len(expected) < 80
    assert sum(t.token_count for t in expected) <= 64 - system_tokens


async def test_a_request_larger_than_the_context_is_refused_with_counts(fake):
    await fake.client.post("/api/models/update_param", json={"context_size": 64})
    sid = await session(fake.client)
    answer = await fake.client.post("/api/chat", json=ask(sid, "word " * 100))
    assert answer.status_code == 400
    detail = answer.json()["detail"]
    assert "context window of 64 tokens" in detail and "messages 100" in detail
    assert await stored(fake.client, sid) == []  # nothing half-written


SESSION_REQUIRED = "session_id is required. Please create a session first."


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, SESSION_REQUIRED),
        ({"session_id": None, "messages": [{"role": "user", "content": "x"}]}, 400, SESSION_REQUIRED),
        ({"session_id": 999_999, "messages": [{"role": "user", "content": "x"}]}, 404, "Session not found"),
    ],
)
async def test_session_errors_have_the_spec_texts(client, body, status, detail):
    answer = await client.post("/api/chat", json=body)
    assert answer.status_code == status
    assert answer.json() == {"detail": detail}


async def test_no_running_llm_is_a_400_with_the_spec_text(client):
    sid = await session(client)
    answer = await client.post("/api/chat", json=ask(sid))
    assert answer.status_code == 400
    assert answer.json() == {"detail": "LLM server is not running. Please select a model first."}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user"}]}, "content"),
        ({"temperature": 2.1}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"repeat_penalty": 0.9}, "repeat_penalty"),
        ({"repeat_penalty": 2.5}, "repeat_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"mode": "embed"}, "mode"),
        ({"session_id": "one"}, "session_id"),
        ({"message": {"role": "user", "content": "x"}}, "messages"),  # both forms at once
    ],
)
async def test_bad_chat_requests_are_400s_naming_the_field(fake, change, field):
    sid = await session(fake.client)
    body = {**ask(sid), **change}
    if body.get("messages") is None:
        body.pop("messages")
    answer = await fake.client.post("/api/chat", json=body)
    assert answer.status_code == 400, answer.text
    assert field in answer.json()["detail"]
    assert await stored(fake.client, sid) == []


async def test_clients_that_vanish_before_the_stream_starts_do_not_block_the_session(fake, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "200")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.005")
    await respawn(fake)
    sid = await session(fake.client)
    host, port = fake.url.removeprefix("http://").split(":")
    body = json.dumps(ask(sid, "gone")).encode()
    request = (f"POST /api/chat HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    for delay in (0, 0.001, 0.003, 0.01, 0.02):
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(request)
        await trio.sleep(delay)
        await stream.aclose()
    with trio.fail_after(10):
        answer = await fake.client.post("/api/chat", json={**ask(sid, "still there?"), "stream": False})
    assert answer.status_code == 200
    assert (await stored(fake.client, sid))[-2]["content"] == "still there?"


async def test_shutdown_mid_stream_keeps_the_partial_reply(nursery, tmp_path, monkeypatch):
    import sqlite3

    import httpx

    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.05")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "400")
    home = tmp_path / "home"
    write_stub_model(home / "models" / "llm" / "fake.gguf")
    settings = make_settings(home, llama_server=str(FAKE_LLAMA_SERVER))
    some = trio.Event()
    async with start_zenow(nursery, settings) as zenow:
        await zenow.client.post("/api/models/load", json={"model_name": "fake"})
        sid = await session(zenow.client)

        async def read_until_cut():
            seen = 0
            try:
                async with httpx.AsyncClient(base_url=zenow.url, timeout=30) as other, \
                        other.stream("POST", "/api/chat", json=ask(sid)) as response:
                    async for line in response.aiter_lines():
                        seen += line.startswith("data: {")
                        if seen == 5:
                            some.set()
            except httpx.HTTPError:
                pass  # zenow went away mid-stream, as it should

        nursery.start_soon(read_until_cut)
        await some.wait()
    with sqlite3.connect(settings.database_path) as db:
        rows = db.execute("SELECT role, content FROM messages WHERE session_id = ? ORDER BY id", (sid,)).fetchall()
    assert [role for role, _ in rows] == ["user", "assistant"]
    assert rows[1][1].startswith("Hello from the fake server.") and len(rows[1][1]) < 400 * 8


async def test_chats_on_different_sessions_do_not_wait_for_each_others_tokenizer(fake, monkeypatch, event_log):
    monkeypatch.setenv("FAKE_LLAMA_TOKENIZE_DELAY", "1.5")
    monkeypatch.setenv("FAKE_LLAMA_TOKENIZE_DELAY_IF", "slowpoke")
    await respawn(fake)
    slow_sid, quick_sid = await session(fake.client), await session(fake.client)
    answers = {}

    async def chat(sid, text):
        answers[text] = await fake.client.post("/api/chat", json={**ask(sid, text), "stream": False})

    async def slow_tokenize_started():  # one call counts several texts: its content is then a list
        return [e for e in events(event_log, "request")
                if e["path"] == "/tokenize" and "slowpoke" in json.dumps((e["body"] or {}).get("content", ""))]

    async with trio.open_nursery() as both:
        both.start_soon(chat, slow_sid, "slowpoke question")
        await wait_for(slow_tokenize_started, timeout=5, what="the slow /tokenize to start")
        with trio.fail_after(1.0):  # the slow one holds its tokenizer call for 1.5 s
            await chat(quick_sid, "quick question")
        assert answers["quick question"].status_code == 200
        assert "slowpoke question" not in answers
    assert answers["slowpoke question"].status_code == 200
    assert [m["content"] for m in await stored(fake.client, slow_sid)] == [
        "slowpoke question", "Hello from the fake server."]


async def test_a_huge_max_tokens_reaches_llama_server_as_at_most_the_context(fake, event_log):
    await fake.client.post("/api/models/update_param", json={"context_size": 256, "max_tokens": 1_000_000})
    sid = await session(fake.client)
    asked = await fake.client.post("/api/chat", json={**ask(sid, "one"), "stream": False, "max_tokens": 1_048_576})
    default = await fake.client.post("/api/chat", json={**ask(sid, "two"), "stream": False})
    assert asked.status_code == default.status_code == 200
    sent = [e["body"]["max_tokens"] for e in events(event_log, "request") if e["path"] == "/v1/chat/completions"]
    assert sent == [256, 256]


# ---------------------------------------------------------------- reading llama-server's stream (no server)

LLAMA_CHUNK = ('data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":%s}}],"created":1795592848,'
               '"id":"chatcmpl-x","model":"/m/SmolLM2.gguf","system_fingerprint":"b1-0c1e570",'
               '"object":"chat.completion.chunk"}\n\n')


def test_content_deltas_pass_through_as_bytes_and_decode_once():
    from zenow.chat import sse
    from zenow.chat._events import Delta
    from zenow.chat._upstream import ReplyReader, decode_literal

    texts = ["Hel", "lo \"you\"\n", "你好", "\\", "\u2028 ok"]
    stream = "".join(LLAMA_CHUNK % json.dumps(t, ensure_ascii=False) for t in texts).encode()
    stream += (b'data: {"choices":[{"finish_reason":"stop","index":0,"delta":{}}],"created":1}\n\n'
               b'data: {"choices":[],"usage":{"completion_tokens":5,"prompt_tokens":9}}\n\ndata: [DONE]\n\n')
    reader = ReplyReader()
    frames, literals = b"", b""
    for i in range(0, len(stream), 7):  # any split of the bytes
        more_frames, more_literals = reader.feed(stream[i:i + 7])
        frames, literals = frames + more_frames, literals + more_literals
    assert reader.done and reader.finish_reason == "stop" and reader.usage["completion_tokens"] == 5
    assert decode_literal(literals) == "".join(texts) and reader.deltas == 5
    events = [json.loads(f[6:]) for f in frames.decode().split("\n\n")[:-1]]
    assert [e["choices"][0]["delta"]["content"] for e in events] == texts
    assert sse(Delta(frames, literals)) == frames and Delta.of("x").content == "x"


def test_other_shapes_are_read_as_json_and_errors_are_raised():
    import pytest as _pytest

    from zenow.chat._upstream import MalformedStream, ReplyReader, UpstreamFailed

    reader = ReplyReader()
    frames, literal = reader.feed(b'data: {"choices":[{"delta":{"content":"a","reasoning":1},"index":0}]}\n\n')
    assert json.loads(frames[6:])["choices"][0]["delta"]["content"] == "a" and literal == b"a"
    with _pytest.raises(UpstreamFailed, match="boom"):
        ReplyReader().feed(b'data: {"error":{"message":"boom"}}\n\n')
    with _pytest.raises(MalformedStream):
        ReplyReader().feed(b"data: {not json\n\n")
    with _pytest.raises(MalformedStream):
        ReplyReader().feed(b"data: " + b"x" * (2 << 20))


async def test_a_lagging_reader_gets_every_waiting_delta_in_one_chunk_of_whole_events():
    from zenow.chat import ChatStream, Delta, Failed, Finished
    from zenow.chat._streamer import EVENT_BUFFER

    send, receive = trio.open_memory_channel(EVENT_BUFFER)
    frames = ChatStream(receive, trio.CancelScope()).frames()
    waiting = [Delta.of(f"token {i} ") for i in range(EVENT_BUFFER)]
    for delta in waiting:
        send.send_nowait(delta)
    assert await frames.__anext__() == b"".join(d.frame for d in waiting)  # all of them, in order, at once
    late = Delta.of("late")
    send.send_nowait(late)
    assert await frames.__anext__() == late.frame
    send.send_nowait(Finished("stop", None))  # no frame of its own: no empty chunk either
    send.send_nowait(Failed("boom"))
    send.close()
    assert json.loads((await frames.__anext__())[6:]) == {"error": "boom"}
    assert await frames.__anext__() == b"data: [DONE]\n\n"


async def test_a_stream_counts_its_first_delta_delivered_once_the_consumer_comes_back_for_more():
    # the request's messages are counted and stored after that (or after a short wait), so the
    # /tokenize call and the inserts never delay the first token on its way to the client
    from zenow.chat import ChatRequest, ChatStream, Delta, Finished

    request = ChatRequest(1, [("user", "hi")])
    send, receive = trio.open_memory_channel(8)
    stream = ChatStream(receive, trio.CancelScope(), None, request.delivered)
    frames = stream.frames()
    send.send_nowait(Finished("stop", None))  # no frame: nothing delivered
    send.send_nowait(Delta.of("first"))
    assert await frames.__anext__() == Delta.of("first").frame
    assert not request.delivered.is_set()  # handed to the consumer, not yet written by it
    send.send_nowait(Delta.of("second"))
    await frames.__anext__()
    assert request.delivered.is_set()
    other = ChatRequest(1, [("user", "hi")])
    ChatStream(trio.open_memory_channel(1)[1], trio.CancelScope(), None, other.delivered).cancel()
    assert other.delivered.is_set()  # a cancelled stream delivers nothing more: nobody waits for it


async def test_a_reader_that_lags_behind_gets_every_event_whole_and_in_order(fake, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "1500")
    await respawn(fake)
    sid = await session(fake.client)
    body = json.dumps(ask(sid)).encode()
    host, port = fake.url.removeprefix("http://").rsplit(":", 1)
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)  # zenow's writes block soon
    await sock.connect((host, int(port)))
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        with trio.fail_after(60):
            while not received.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of the body
                received += await stream.receive_some(4096)
                await trio.sleep(0.001)  # a slow reader: zenow falls behind llama-server meanwhile
    head, _, chunked = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
    events, rest = [], chunked
    while True:  # every HTTP chunk zenow wrote holds whole events, never a piece of one
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunk, rest = rest[:size], rest[size + 2:]
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
        events += chunk.decode().split("\n\n")[:-1]
    assert events[-1] == "data: [DONE]"
    deltas = [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert len(deltas) == 1500
    assert (await stored(fake.client, sid))[1]["content"] == "".join(deltas)


async def test_a_request_after_a_pause_never_lands_on_a_connection_the_server_is_closing(fake, monkeypatch):
    # llama-server closes a connection idle for 5 s, as httpx's pool drops one: a request sent at
    # that moment was lost.  This fake closes, unanswered, a request on a connection idle 2.2 s.
    monkeypatch.setenv("FAKE_LLAMA_KEEPALIVE_CLOSE", "2.2")
    await respawn(fake)
    sid = await session(fake.client)
    v1 = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}
    for turn in range(2):
        if turn:
            await trio.sleep(2.5)  # past the fake's close, within httpx's own 5 s
        answers = [await fake.client.post("/api/chat", json=ask(sid, f"question {turn}", stream=False))]
        answers.append(await fake.client.post("/v1/chat/completions", json=v1))
        assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert [m["role"] for m in await stored(fake.client, sid)] == ["user", "assistant"] * 2


async def test_streamed_requests_to_llama_server_end_their_connection(fake, event_log):
    # llama-server closes a connection after a streamed answer without saying so: a request sent
    # on it next was lost.  Streamed requests ask for the close; the others keep their connection.
    sid = await session(fake.client)
    v1 = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}
    assert (await fake.client.post("/api/chat", json=ask(sid))).status_code == 200
    assert (await fake.client.post("/v1/chat/completions", json={**v1, "stream": True})).status_code == 200
    assert (await fake.client.post("/v1/chat/completions", json=v1)).status_code == 200
    completions = [e for e in events(event_log, "request") if e["path"] == "/v1/chat/completions"]
    assert [(e["body"].get("stream", False), e["connection"]) for e in completions] == [
        (True, "close"), (True, "close"), (False, "keep-alive")]
    assert all(e["connection"] != "close" for e in events(event_log, "request") if e["path"] == "/tokenize")

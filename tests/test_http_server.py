"""zenow's connection handler (`zenow.http_server`): one write for a fixed-length response, and
the keep-alive timer.

A fixed-length response goes out in one socket write.
hypercorn hands its connection handler the head, the body and h11's end of message as three
pieces; zenow's handler writes a head that declares its length together with the body that
follows it.  The pieces here are what h11 itself produces for each kind of response; the
stream records each `send_all`, as the socket would see it.  Then the same over real sockets:
answers of every kind still arrive whole, and an event stream's head arrives before any event.

The keep-alive timer, over real sockets: an idle connection is closed after `keep_alive_timeout`
and not while requests keep coming or an answer is still streaming; a connection the client
closed frees its slot at once; idle connections are closed at shutdown.  (With hypercorn 0.18's
own timer on trio, the first and the last of these failed: a connection idle after an answer
stayed open, past the timeout and through a shutdown until the graceful timeout.)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated

from tests.support.harness import make_settings, start_zenow
from zenow.http_server import _Connection


class RecordingStream:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    async def send_all(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        self.closed = True


class Protocol:
    async def handle(self, event: Any) -> None:
        pass


def handler() -> tuple[_Connection, RecordingStream]:
    stream = RecordingStream()
    server = _Connection(None, Config(), None, {}, stream)  # type: ignore[arg-type]
    server.protocol = Protocol()  # type: ignore[assignment]
    return server, stream


def answering(method: bytes = b"GET") -> h11.Connection:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"%s / HTTP/1.1\r\nHost: x\r\n\r\n" % method)
    assert isinstance(conn.next_event(), h11.Request)
    return conn


def h11_pieces(status: int, headers: list[tuple[bytes, bytes]], chunks: list[bytes],
               method: bytes = b"GET") -> list[bytes]:
    """What hypercorn's h11 protocol passes on for one response, piece by piece."""
    conn = answering(method)
    pieces = [conn.send(h11.Response(status_code=status, headers=headers))]
    pieces += [conn.send(h11.Data(data=chunk)) for chunk in chunks]
    pieces.append(conn.send(h11.EndOfMessage()))
    return [p for p in pieces if p is not None]


async def replay(pieces: list[bytes], *then: Any) -> list[bytes]:
    server, stream = handler()
    for piece in pieces:
        await server.protocol_send(RawData(data=piece))
    for event in then:
        await server.protocol_send(event)
    return stream.writes


async def test_a_json_answer_is_one_write_holding_head_and_body() -> None:
    body = b'{"sessions": []}'
    pieces = h11_pieces(200, [(b"content-type", b"application/json"), (b"Content-Length", b"%d" % len(body))],
                        [body])
    assert len(pieces) == 3 and pieces[-1] == b""  # head, body, h11's empty end of message
    writes = await replay(pieces)
    assert writes == [pieces[0] + body]


async def test_an_answer_without_a_body_is_its_head_alone() -> None:
    for status, method in ((204, b"GET"), (200, b"HEAD"), (404, b"GET")):
        pieces = h11_pieces(status, [(b"content-length", b"0")], [], method=method)
        assert await replay(pieces) == [pieces[0]]


async def test_a_head_kept_is_written_before_the_connection_closes() -> None:
    head = answering().send(h11.Response(status_code=500, headers=[(b"content-length", b"5")]))
    assert head is not None
    server, stream = handler()
    await server.protocol_send(RawData(data=head))
    assert stream.writes == []
    await server.protocol_send(Closed())
    assert stream.writes == [head] and stream.closed


async def test_a_streamed_answer_sends_its_head_at_once_and_each_chunk_as_it_comes() -> None:
    pieces = h11_pieces(200, [(b"content-type", b"text/event-stream")], [b"data: 1\n\n", b"data: 2\n\n"])
    assert b"transfer-encoding: chunked" in pieces[0].lower()
    server, stream = handler()
    await server.protocol_send(RawData(data=pieces[0]))
    assert stream.writes == [pieces[0]]  # a client waiting for the head is not kept waiting for an event
    for piece in pieces[1:]:
        await server.protocol_send(RawData(data=piece))
    assert stream.writes == pieces


async def test_informational_heads_and_other_events_pass_through() -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    conn.next_event()
    continue_head = conn.send(h11.InformationalResponse(status_code=100, headers=[]))
    assert continue_head is not None
    writes = await replay([continue_head], Updated(idle=False))
    assert writes == [continue_head]


async def test_real_sockets_answers_whole_and_event_stream_head_at_once(tmp_path: Any) -> None:
    async with trio.open_nursery() as nursery, start_zenow(nursery, make_settings(tmp_path)) as zenow:
        http = zenow.client
        created = await http.post("/api/sessions", json={"first_message": "hello"})
        assert created.status_code == 200
        listed = await http.get("/api/sessions")
        assert listed.json()["total"] == 1
        assert (await http.head("/api/sessions")).headers["content-length"] == listed.headers["content-length"]
        missing = await http.get("/api/sessions/999999")
        assert missing.status_code == 404 and set(missing.json()) == {"detail"}
        with trio.fail_after(2):  # the head of an event stream comes before any event does
            async with http.stream("GET", "/api/events") as events:
                assert events.status_code == 200
                assert events.headers["content-type"].startswith("text/event-stream")



REQUEST = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def open_connection(url: str) -> trio.SocketStream:
    host, port = url.removeprefix("http://").split(":")
    return await trio.open_tcp_stream(host, int(port))


async def ask(stream: trio.SocketStream) -> bytes:
    """One request on a kept-alive connection; its whole answer."""
    await stream.send_all(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
            data.lower().split(b"content-length:")[1].split(b"\r\n")[0]):
        chunk = await stream.receive_some(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    return data


async def closed_by_server(stream: trio.SocketStream) -> bool:
    return await stream.receive_some(65536) == b""


async def test_an_idle_connection_is_closed_after_the_timeout_not_while_requests_come(tmp_path: Any) -> None:
    settings = make_settings(tmp_path, keep_alive_timeout=0.5)
    async with trio.open_nursery() as nursery, start_zenow(nursery, settings) as zenow:
        stream = await open_connection(zenow.url)
        for _ in range(8):  # 1.6 s of requests 0.2 s apart, three timeouts' worth: each moves the deadline
            assert (await ask(stream)).startswith(b"HTTP/1.1 200")
            await trio.sleep(0.2)
        started = trio.current_time()
        with trio.fail_after(5):
            assert await closed_by_server(stream)
        assert trio.current_time() - started >= 0.2  # not at once: the timeout ran from the last answer
        await stream.aclose()


async def test_a_streamed_answer_outlives_the_keep_alive_timeout(tmp_path: Any) -> None:
    settings = make_settings(tmp_path, keep_alive_timeout=0.3)
    async with (trio.open_nursery() as nursery, start_zenow(nursery, settings) as zenow,
                zenow.client.stream("GET", "/api/events") as events):
        lines = events.aiter_lines()
        await trio.sleep(1.0)  # the client sends nothing for three timeouts
        created = await zenow.client.post("/api/sessions", json={"first_message": "still there"})
        assert created.status_code == 200
        with trio.fail_after(5):
            async for line in lines:
                if "still there" in line:
                    break


async def test_a_connection_the_client_closed_frees_its_slot_at_once(tmp_path: Any) -> None:
    """Two slots and a keep-alive timeout of a minute: ten connections one after another each get
    an answer at once (the timer's task ends with the connection, not at its deadline)."""
    settings = make_settings(tmp_path, keep_alive_timeout=60.0, max_connections=2)
    async with trio.open_nursery() as nursery, start_zenow(nursery, settings) as zenow:
        with trio.fail_after(10):
            for _ in range(10):
                stream = await open_connection(zenow.url)
                assert (await ask(stream)).startswith(b"HTTP/1.1 200")
                await stream.aclose()


async def test_idle_connections_are_closed_at_shutdown(tmp_path: Any) -> None:
    settings = replace(make_settings(tmp_path, keep_alive_timeout=60.0), graceful_timeout=30.0)
    async with trio.open_nursery() as nursery:
        async with start_zenow(nursery, settings) as zenow:
            streams = [await open_connection(zenow.url) for _ in range(3)]
            for stream in streams:
                assert (await ask(stream)).startswith(b"HTTP/1.1 200")
            zenow.shutdown.set()
            with trio.fail_after(5):  # well before the keep-alive timeout and the graceful timeout
                for stream in streams:
                    assert await closed_by_server(stream)
        for stream in streams:
            await stream.aclose()

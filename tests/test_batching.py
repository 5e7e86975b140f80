"""Batched reads of a token stream (`zenow.servers.batched_reads`) over real sockets.

A raw server on 127.0.0.1 writes an event stream at a chosen pace, as llama-server writes
tokens; the client reads it the way zenow's two chat paths do (httpx, `STREAM_HEADERS`,
`aiter_raw`).  What is counted is the kernel's: each `recv` the client's socket made.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import httpx
import trio

from tests.support.harness import wait_for
from tests.support.raw_http import STREAM_HEAD, read_request
from zenow.servers import STREAM_HEADERS, batched_reads, upstream_client


def event(n: int) -> bytes:
    return b'data: {"choices":[{"delta":{"content":"token %d"},"index":0}]}\n\n' % n


@dataclass
class Paced:
    """The server's plan: `count` events `gap` seconds apart.  With `pause`, the first time events
    wait unread below a raised mark, it sends nothing more until the client has read them all."""

    count: int
    gap: float
    pause: bool = False
    paused: bool = False
    sent: bytes = b""
    received: bytearray = field(default_factory=bytearray)
    mark: int = 1  # the client's, after its last read


@dataclass
class Reads:
    recvs: int  # the client socket's recv calls
    marks: list[int]  # the mark after each read
    released: int  # times the timer dropped the mark


async def read_paced(nursery: trio.Nursery, paced: Paced, window: float) -> Reads:
    """Stream `paced` through `batched_reads(window)`."""

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            await read_request(stream)
            await stream.send_all(STREAM_HEAD)
            for n in range(paced.count):
                if n:
                    await trio.sleep(paced.gap)
                paced.sent += event(n)
                await stream.send_all(event(n))
                if paced.pause and not paced.paused and paced.mark > 1 and len(paced.received) < len(paced.sent):
                    paced.paused = True
                    sent = len(paced.sent)
                    await wait_for(_async(lambda sent=sent: len(paced.received) == sent), timeout=10,
                                   interval=0.01, what="the bytes before the pause, read")

    (listener,) = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    recvs, marks = 0, []
    async with upstream_client(httpx.Timeout(10.0)) as http, \
            http.stream("POST", f"http://127.0.0.1:{port}/", json={}, headers=STREAM_HEADERS) as response:
        sock = response.extensions["network_stream"].get_extra_info("socket")
        recv = sock.recv

        async def counted(*args: int) -> bytes:
            nonlocal recvs
            recvs += 1
            return await recv(*args)

        sock.recv = counted
        async with batched_reads(response, window) as batching:
            async for data in response.aiter_raw():
                batching.received(len(data))
                paced.received += data
                paced.mark = batching.mark
                marks.append(batching.mark)
    assert bytes(paced.received) == paced.sent  # every byte, in order
    return Reads(recvs, marks, batching.released)


def _async(predicate):
    async def check() -> bool:
        return predicate()
    return check


async def test_a_fast_stream_is_read_several_tokens_a_wakeup(nursery):
    paced = Paced(count=60, gap=0.004)  # 250 tokens a second, a window of 25 ms: about six a read
    reads = await read_paced(nursery, paced, 0.025)
    assert max(reads.marks) > len(event(0))  # the mark went past one token...
    assert reads.recvs <= paced.count // 2  # ...and the kernel woke the reader for two tokens or more
    assert reads.marks[:2] == [1, 1]  # the first tokens are read as they come


async def test_a_stream_slower_than_two_tokens_a_window_is_read_token_by_token(nursery):
    reads = await read_paced(nursery, Paced(count=8, gap=0.03), 0.025)
    assert set(reads.marks) == {1} and reads.released == 0


async def test_with_no_window_nothing_is_batched(nursery):
    paced = Paced(count=30, gap=0.004)
    reads = await read_paced(nursery, paced, 0.0)
    assert set(reads.marks) == {1}
    assert reads.recvs >= paced.count // 2  # no mark: the reader wakes about once a token (some arrive together)


async def test_the_end_of_a_stream_is_not_held_back_by_the_mark(nursery):
    # A window of 200 ms sets a mark of ~50 tokens; the stream has 30, and the timer that would
    # release them fires 300-400 ms after the last read.  The server's close wakes the reader first.
    paced = Paced(count=30, gap=0.004)
    with trio.fail_after(10):
        reads = await read_paced(nursery, paced, 0.2)
    assert max(reads.marks) > 1 and reads.released == 0
    assert reads.recvs < paced.count // 2


async def test_tokens_below_the_mark_are_released_when_the_stream_stalls(nursery):
    # Fast tokens raise the mark; once some wait below it, the server sends nothing more until the
    # client has read them, which it can only once the timer drops the mark (at most 2 windows after
    # the last read).  Without the timer, this never ends.
    paced = Paced(count=40, gap=0.004, pause=True)
    with trio.fail_after(20):
        reads = await read_paced(nursery, paced, 0.05)
    assert paced.paused and reads.released >= 1


def test_the_window_is_given_in_milliseconds_and_0_turns_batching_off():
    from zenow.settings import Settings

    def window(**env: str) -> float:
        return Settings.from_environment({"HOME": "/nonexistent", **env}).stream_batch_window

    assert (window(), window(ZENOW_STREAM_BATCH_MS="40"), window(ZENOW_STREAM_BATCH_MS="0")) == (0.05, 0.04, 0)

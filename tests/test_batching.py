"""Batched reads of a token stream (`zenow.servers.batched_reads`) over real sockets.

A raw server on 127.0.0.1 writes an event stream at a chosen pace, as llama-server writes
tokens; the client reads it the way zenow's two chat paths do (httpx, `STREAM_HEADERS`,
`aiter_raw`).  What is counted is the kernel's: each `recv` the client's socket made.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import httpx
import pytest
import trio

from tests.support.harness import make_settings, start_zenow, wait_for, wait_status
from tests.support.llama import child_auth, child_url
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
    body: bytes = b""


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

    def received(data: bytes, mark: int) -> None:
        paced.received += data
        paced.mark = mark

    reads = await read_batched(f"http://127.0.0.1:{port}/", {}, window, received)
    assert bytes(paced.received) == paced.sent  # every byte, in order
    return reads


async def read_batched(url: str, body: dict, window: float, received=None, auth: httpx.Auth | None = None) -> Reads:
    """POST `body` to `url` and read the streamed answer as zenow does, through `batched_reads(window)`;
    `received(data, mark)` after each read."""
    recvs, marks = 0, []
    async with upstream_client(httpx.Timeout(60.0)) as http, \
            http.stream("POST", url, json=body, headers=STREAM_HEADERS, auth=auth) as response:
        assert response.status_code == 200
        sock = response.extensions["network_stream"].get_extra_info("socket")
        recv = sock.recv

        async def counted(*args: int) -> bytes:
            nonlocal recvs
            recvs += 1
            return await recv(*args)

        sock.recv = counted
        body_bytes = bytearray()
        async with batched_reads(response, window) as batching:
            async for data in response.aiter_raw():
                batching.received(len(data))
                body_bytes += data
                marks.append(batching.mark)
                if received is not None:
                    received(data, batching.mark)
    return Reads(recvs, marks, batching.released, bytes(body_bytes))


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


@pytest.mark.real_llama
async def test_the_real_llama_server_stream_is_read_in_groups_and_whole(nursery, tmp_path, llama_server, smollm2):
    """SmolLM2 on the real llama-server, the same request read token by token and in groups: the
    same tokens, far fewer reads, and its end comes with llama-server's close, not the timer."""
    settings = make_settings(tmp_path / "home", llama_server=llama_server, default_llm=smollm2)
    async with start_zenow(nursery, settings) as zenow:
        await wait_status(zenow.client, "running")
        url = f"{child_url()}/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "Tell me a story about a lighthouse."}],
                "stream": True, "temperature": 0, "seed": 42, "max_tokens": 64}
        await read_batched(url, body, 0.0, auth=child_auth())  # the prompt cached: both reads below alike
        alone = await read_batched(url, body, 0.0, auth=child_auth())
        grouped = await read_batched(url, body, 0.2, auth=child_auth())

    def content(raw: bytes) -> str:
        chunks = [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: {")]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])

    assert content(grouped.body) == content(alone.body) and len(content(alone.body)) > 100
    assert grouped.body.endswith(b"data: [DONE]\n\n")
    assert max(grouped.marks) > 1 and grouped.released == 0
    assert grouped.recvs * 3 < alone.recvs

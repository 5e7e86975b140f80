"""The upstream actor: owns the HTTP client `/v1` reaches the llama-servers with, and every
`/v1` request to them while it is in flight.

Each request runs as a task in the actor's nursery under a cancel scope the caller
holds, so a caller that goes away (a client disconnect, even one that happens before
a streamed body is first iterated) stops the upstream request at once with a plain,
synchronous `cancel()`.  The actor's loop only starts tasks: it never waits on
llama-server, so requests of every mode run side by side.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import outcome
import trio

from ..actor import Actor
from ..channels import send_soon
from ..errors import ActorCrashed, UpstreamError, ZenowError
from ..event_stream import DataLines, decode_literal
from ..servers import STREAM_HEADERS, batched_reads, upstream_client
from ..settings import DEFAULT_STREAM_BATCH_WINDOW
from ._readahead import ReadAhead, ended_well
from ._shapes import DONE, chat_chunk, content_chunk_event, error_event, sse, upstream_failure

__all__ = ["ChatStreamCall", "UpstreamActor", "UpstreamCall"]

log = logging.getLogger(__name__)

#: Seconds without a byte from llama-server before a request fails (a long prompt on a CPU).
READ_TIMEOUT = 600.0


@dataclass(frozen=True)
class UpstreamCall:
    """One request to a llama-server whose answer is JSON.  `param` names the request field
    to blame when llama-server finds the input too long."""

    method: Literal["GET", "POST"]
    url: str
    payload: dict[str, Any] | None = None
    param: str | None = None
    #: What the server needs with every request (its key: see `ServerStatus.auth_headers`).
    headers: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class ChatStreamCall:
    """A streamed chat completion; `model_name` replaces llama-server's in every chunk."""

    url: str
    payload: dict[str, Any]
    model_name: str
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    #: The conversation's next turn to read ahead once the reply ended well and its client has the end.
    read_ahead: ReadAhead | None = None


class UpstreamActor(Actor):
    def __init__(self, read_timeout: float = READ_TIMEOUT, batch_window: float = DEFAULT_STREAM_BATCH_WINDOW) -> None:
        self._batch_window = batch_window
        # No pool limit of our own: the HTTP front caps open connections (`max_connections`), and
        # a pool limit here would fail the request beyond it after the pool timeout instead.
        self._http = upstream_client(httpx.Timeout(10.0, read=read_timeout))

    async def teardown(self) -> None:
        await self._http.aclose()

    async def start_call(self, call: UpstreamCall, reply: trio.MemorySendChannel[outcome.Outcome[Any]],
                         scope: trio.CancelScope) -> None:
        """Start `call`; its outcome (the decoded JSON, or the error) goes to `reply`.

        Cancelling `scope` stops the request; then `reply` is closed with nothing sent.
        """
        self.nursery.start_soon(self._run_call, call, reply, scope)

    async def start_stream(self, call: ChatStreamCall, frames: trio.MemorySendChannel[bytes],
                           started: trio.MemorySendChannel[outcome.Outcome[None]], scope: trio.CancelScope,
                           on_end: Callable[[], None]) -> None:
        """Start streaming `call`: `started` gets `Value(None)` once llama-server accepted it
        (or the error that refused it), then `frames` gets whole SSE events ending with
        `DONE`, an error event coming first when llama-server fails mid-stream.

        `on_end` runs when the upstream request has ended, however it ended.  Cancelling
        `scope` closes the upstream request at once.
        """
        self.nursery.start_soon(self._run_stream, call, frames, started, scope, on_end)

    async def start_read_ahead(self, read_ahead: ReadAhead, on_end: Callable[[], None]) -> None:
        """Start `read_ahead.run()` (a whole completion's, which its client has); `on_end` runs once it is over."""
        self.nursery.start_soon(self._read_ahead, read_ahead, on_end)

    async def _read_ahead(self, read_ahead: ReadAhead, on_end: Callable[[], None]) -> None:
        try:
            await read_ahead.run(self._http)
        finally:
            on_end()

    async def _run_call(self, call: UpstreamCall, reply: trio.MemorySendChannel[outcome.Outcome[Any]],
                        scope: trio.CancelScope) -> None:
        with reply:
            result: outcome.Outcome[Any] | None = None
            with scope:
                result = await outcome.acapture(_request_json, self._http, call)
            if result is None:
                return  # the caller went away
            if isinstance(result, outcome.Error) and not isinstance(result.error, ZenowError):
                log.error("upstream request %s %s failed", call.method, call.url, exc_info=result.error)
                result = outcome.Error(ActorCrashed(f"Internal error calling llama-server: "
                                                    f"{type(result.error).__name__}: {result.error}"))
            try:
                reply.send_nowait(result)
            except (trio.BrokenResourceError, trio.WouldBlock):
                pass

    async def _run_stream(self, call: ChatStreamCall, frames: trio.MemorySendChannel[bytes],
                          started: trio.MemorySendChannel[outcome.Outcome[None]], scope: trio.CancelScope,
                          on_end: Callable[[], None]) -> None:
        try:
            with frames, started, scope:
                await _stream_chat(self._http, call, frames, started, self._batch_window)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the consumer went away; the upstream request is closed by now
        except Exception:
            log.exception("streaming %s failed", call.url)
        finally:
            try:
                if call.read_ahead is not None:  # still leased: a switch of the model waits for it
                    await call.read_ahead.run(self._http)
            finally:
                on_end()


async def _request_json(http: httpx.AsyncClient, call: UpstreamCall) -> Any:
    """Send `call` and decode its JSON answer.  Raises `UpstreamError` or what
    `upstream_failure` makes of a refusal."""
    try:
        response = await http.request(call.method, call.url, json=call.payload, headers=call.headers)
    except httpx.HTTPError as exc:
        raise UpstreamError(_connection_failed(exc), code="upstream_error") from exc
    if response.status_code != 200:
        raise upstream_failure(response.status_code, response.text, call.param)
    try:
        return response.json()
    except ValueError as exc:
        raise UpstreamError(f"llama-server sent malformed JSON: {exc}", code="upstream_error") from exc


async def _stream_chat(http: httpx.AsyncClient, call: ChatStreamCall, frames: trio.MemorySendChannel[bytes],
                       started: trio.MemorySendChannel[outcome.Outcome[None]], batch_window: float = 0.0) -> None:
    """Stream `call` into `frames` (see `UpstreamActor.start_stream`).  With a `read_ahead`, the reply is
    kept and handed to it when it ended well (`ReadAhead.ended`) before its end (`DONE`) goes out."""
    accepted = False
    #: The reply's content as JSON string bodies, when it is to be read ahead; its finish reason.
    contents: list[bytes] | None = [] if call.read_ahead is not None else None
    finish_reason: object = None

    async def fail(message: str) -> None:
        if accepted:
            await frames.send(error_event(message))
            await frames.send(DONE)
        else:
            started.send_nowait(outcome.Error(UpstreamError(message, code="upstream_error")))

    try:
        headers = {**call.headers, **STREAM_HEADERS}  # llama-server ends the connection with the stream
        async with http.stream("POST", call.url, json=call.payload, headers=headers) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                started.send_nowait(outcome.Error(upstream_failure(response.status_code, body, "messages")))
                return
            started.send_nowait(outcome.Value(None))
            accepted = True
            model_literal = json.dumps(call.model_name, ensure_ascii=False).encode()
            lines = DataLines()
            async with batched_reads(response, batch_window) as batching:
                async for data in response.aiter_raw():  # uncompressed (STREAM_HEADERS)
                    batching.received(len(data))
                    for payload in lines.feed(data):
                        if payload == b"[DONE]":
                            read_ahead = call.read_ahead
                            if read_ahead is not None and contents and ended_well(finish_reason):
                                read_ahead.ended(decode_literal(b"".join(contents)))
                            await frames.send(DONE)
                            if read_ahead is not None:  # the end went out: closing the response may be cancelled
                                read_ahead.delivered = True
                            return
                        event = content_chunk_event(payload, model_literal)
                        if event is not None:
                            if contents is not None:
                                contents.append(event[1])
                            await send_soon(frames, event[0])
                            continue
                        chunk = json.loads(payload)
                        if not isinstance(chunk, dict):
                            raise ValueError(f"a chunk that is not an object: {payload[:200]!r}")
                        if "error" in chunk:
                            error = chunk["error"]
                            message = error.get("message", error) if isinstance(error, dict) else error
                            await fail(f"llama-server failed: {message}")
                            return
                        if contents is not None:
                            finish_reason = _read_choice(chunk, contents) or finish_reason
                        await send_soon(frames, sse(chat_chunk(chunk, call.model_name)))
        await fail("llama-server ended the stream without [DONE]")
    except httpx.HTTPError as exc:
        await fail(_connection_failed(exc))
    except ValueError as exc:  # json.JSONDecodeError and MalformedStream included
        await fail(f"llama-server sent malformed data: {exc}")


def _read_choice(chunk: dict[str, Any], contents: list[bytes]) -> object:
    """Append the content of a decoded chunk's choice to `contents` (as a JSON string body); its finish reason."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    delta = choices[0].get("delta")
    content = delta.get("content") if isinstance(delta, dict) else None
    if isinstance(content, str) and content:
        contents.append(json.dumps(content, ensure_ascii=False).encode()[1:-1])
    return choices[0].get("finish_reason")


def _connection_failed(exc: httpx.HTTPError) -> str:
    return f"llama-server connection failed: {type(exc).__name__}: {exc}".rstrip(": ")

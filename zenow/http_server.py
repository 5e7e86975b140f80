"""Serving the app with hypercorn's HTTP/1.1 protocol on trio, with a cap on open connections.

hypercorn's own `worker_serve` accepts every connection it is offered; on a small
machine a flood of slow or half-open connections would then hold a task, a socket
and a buffer each.  This is the same serving loop (lifespan, one `TCPServer` per
connection, graceful shutdown) with a semaphore taken before each `accept`: past
`max_connections`, new connections wait in the kernel's listen backlog.  Slow
clients are dropped by hypercorn's `keep_alive_timeout` (no complete request line
and headers within it) and by Quart's `BODY_TIMEOUT` (a body sent too slowly).

A response of known length goes out in one socket write: hypercorn writes the head, the body and
h11's (empty) end of message separately, two `send` calls and a segment each; `_OneWriteTCPServer`
keeps a head that declares a `content-length` until its body comes (always right after it, from the
same task) and writes the two together.  A streamed response (no length: server-sent events) is
written as before, its head at once.
"""

from __future__ import annotations

import socket
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.events import Event, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown

__all__ = ["serve_http"]


class _OneWriteTCPServer(TCPServer):
    """hypercorn's connection handler, writing a fixed-length response's head and body together."""

    _held: bytes = b""

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            data = event.data
            if self._held:  # the body, or the empty end of a bodiless answer
                data, self._held = self._held + data, b""
            elif _has_length(data):
                self._held = data
                return
            if not data:  # h11's end of a fixed-length message: nothing to write
                return
            event = RawData(data=data)
        elif self._held:  # closing with a head kept: write it first
            held, self._held = self._held, b""
            await super().protocol_send(RawData(data=held))
        await super().protocol_send(event)


def _has_length(data: bytes) -> bool:
    """Whether `data` is a final response head (h11 writes it as one piece) declaring its length."""
    if not data.startswith(b"HTTP/1.1 ") or data[9:10] == b"1" or not data.endswith(b"\r\n\r\n"):
        return False
    return b"\r\ncontent-length:" in data.lower()


class _CappedListener(trio.abc.Listener[trio.SocketStream]):
    """Accepts a connection only while fewer than the semaphore's count are open."""

    def __init__(self, inner: trio.SocketListener, open_slots: trio.Semaphore) -> None:
        self._inner = inner
        self._slots = open_slots

    async def accept(self) -> trio.SocketStream:
        await self._slots.acquire()
        try:
            return await self._inner.accept()
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


async def serve_http(
    app: AppWrapper,
    config: Config,
    listener: socket.socket,
    *,
    max_connections: int,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on `listener` until `shutdown` is set; then open requests get
    `config.graceful_timeout` seconds before they are cancelled.  Started means accepting."""
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)
    open_slots = trio.Semaphore(max_connections)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            # TCPServer is typed for TLS streams but serves plain ones too (it checks).
            await _OneWriteTCPServer(app, config, context, ConnectionState(lifespan_state.copy()), stream)  # type: ignore[arg-type]
        finally:
            open_slots.release()

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as server_nursery:
            capped = _CappedListener(trio.SocketListener(trio.socket.from_stdlib_socket(listener)), open_slots)
            task_status.started()
            try:
                async with trio.open_nursery(strict_exception_groups=True) as nursery:
                    nursery.start_soon(raise_shutdown, shutdown.wait)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    nursery.start_soon(partial(trio.serve_listeners, handle, [capped], handler_nursery=server_nursery))
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()

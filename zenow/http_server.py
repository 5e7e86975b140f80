"""Serving the app with hypercorn's HTTP/1.1 protocol on trio, with a cap on open connections.

hypercorn's own `worker_serve` accepts every connection it is offered; on a small
machine a flood of slow or half-open connections would then hold a task, a socket
and a buffer each.  This is the same serving loop (lifespan, one `TCPServer` per
connection, graceful shutdown) with a semaphore taken before each `accept`: past
`max_connections`, new connections wait in the kernel's listen backlog.  Slow
clients are dropped by hypercorn's `keep_alive_timeout` (no complete request line
and headers within it) and by Quart's `BODY_TIMEOUT` (a body sent too slowly).

A response of known length goes out in one socket write: hypercorn writes the head, the body and
h11's (empty) end of message separately, two `send` calls and a segment each; `_Connection`
keeps a head that declares a `content-length` until its body comes (always right after it, from the
same task) and writes the two together.  A streamed response (no length: server-sent events) is
written as before, its head at once.

The keep-alive timeout is one task per connection waiting on a deadline that moves
(`_KeepAliveTimer`).  hypercorn's own starts a task each time a connection goes idle and cancels it
when the next request comes, a sixth of the CPU of a small request; and on trio it did not close a
connection left idle after an answer, neither after the timeout nor at shutdown (which then waited
for the graceful timeout).
"""

from __future__ import annotations

import math
import socket
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Event, RawData
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ConnectionState, LifespanState
from hypercorn.utils import ShutdownError, raise_shutdown

__all__ = ["serve_http"]


class _Connection(TCPServer):
    """hypercorn's connection handler, writing a fixed-length response's head and body together,
    with a cheaper keep-alive timer."""

    _held: bytes = b""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.idle_task = self.keep_alive = _KeepAliveTimer(self)  # type: ignore[assignment]

    async def _read_data(self) -> None:
        try:
            await super()._read_data()
        finally:  # the client is gone: nothing is left to time out
            self.keep_alive.cancel()

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


class _KeepAliveTimer:
    """A connection's keep-alive timeout, in hypercorn's `SingleTask` interface, which hypercorn
    calls `restart` when the connection goes idle (after an answer, and at the start) and `stop`
    when a request arrives.  Idle for `keep_alive_timeout`, or idle when the server shuts down:
    the connection is closed, as hypercorn's own `_idle_timeout` does.  One task waits for the
    connection's life; going idle or busy only moves its deadline."""

    def __init__(self, server: TCPServer) -> None:
        self._server = server
        self._deadline = math.inf  # while busy
        self._scope: trio.CancelScope | None = None
        self._watching = trio.CancelScope()
        self._started = False

    async def restart(self, task_group: Any, action: object) -> None:  # `action`: hypercorn's own timer, unused
        self._move(trio.current_time() + self._server.config.keep_alive_timeout)
        if not self._started:
            self._started = True
            task_group.spawn(self._watch)

    async def stop(self) -> None:
        self._move(math.inf)

    def cancel(self) -> None:
        self._watching.cancel()

    def _move(self, deadline: float) -> None:
        self._deadline = deadline
        if self._scope is not None:
            self._scope.deadline = deadline

    async def _watch(self) -> None:
        terminated = self._server.context.terminated
        with self._watching:
            while True:
                with trio.CancelScope(deadline=self._deadline) as self._scope:
                    await terminated.wait()
                self._scope = None
                if self._deadline != math.inf:  # idle past the timeout, or idle at shutdown
                    break
                if terminated.is_set():  # busy at shutdown: hypercorn closes after the answer
                    return
            with trio.CancelScope(shield=True):
                await self._server._initiate_server_close()


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
            await _Connection(app, config, context, ConnectionState(lifespan_state.copy()), stream)
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

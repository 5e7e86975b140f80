"""Reading a fast token stream in batches: one wakeup for several tokens, none of them held back long.

llama-server writes each token of a streamed answer as soon as it has it; a small model on a
small machine writes one every few milliseconds.  Read as it comes, every token wakes zenow's
event loop once, and a wakeup after milliseconds asleep (caches cold, the model's threads on
every core) costs more CPU than everything zenow then does with the token: on two cores, the
time is taken from generation (`bench/RESULTS.md`, "the floor under zenow's CPU per token").

`batched_reads` lets the kernel gather them: while a stream runs faster than a token per half
`window`, the socket's `SO_RCVLOWAT` is set to about the bytes that arrive in a `window`, so
the event loop is woken when that many are waiting, not at each token.  Nothing waits past a
deadline: the first token is read at once (the mark starts at one byte), a stream that slows
down has its mark dropped back to one byte by a timer 1.5 to 2 windows after the last read
(lowering the mark wakes a reader with bytes waiting), and the end of the stream is never
held back: streams are read on a connection the server closes (`STREAM_HEADERS`), and the close
wakes the reader whatever the mark.  Slow streams are never batched.
"""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..errors import single_cause

__all__ = ["MAX_MARK", "ReadBatching", "batched_reads"]

#: The highest mark set, in bytes (well under any receive buffer: the kernel grows none for it).
MAX_MARK = 16384


#: Reads less than this apart (seconds) drain one wakeup's bytes; more apart, they are two wakeups.
BURST = 0.001


class ReadBatching:
    """The mark of one stream's socket, moved by `received` as the stream's pace is measured.

    The pace is measured per wakeup (the reads of one wakeup come back to back, as the body's
    parser hands over what one `recv` returned): the bytes a wakeup read arrived since the
    wakeup before it.
    """

    __slots__ = ("_last", "_mark", "_rate", "_socket", "_timer", "_unit", "_wake_bytes", "_wake_interval",
                 "_wake_start", "released", "window")

    def __init__(self, sock: Any, window: float) -> None:
        self._socket = sock
        self.window = window
        self._mark = 1
        self._rate = 0.0  # bytes a second, smoothed over wakeups
        self._unit = 0.0  # the bytes of one wakeup while each wakeup read one token
        self._last = self._wake_start = self._wake_interval = -math.inf
        self._wake_bytes = 0
        self._timer = trio.CancelScope()
        #: How many times the timer dropped the mark (the stream slowed down or stalled).
        self.released = 0

    @property
    def mark(self) -> int:
        return self._mark

    def received(self, size: int) -> None:
        """Note a read of `size` bytes; at each wakeup after the first two, set the mark to the
        bytes the stream sends in a window (less half a token, at most twice what the last wakeup
        read), or to one byte when that is under two tokens."""
        now = trio.current_time()
        if now - self._last > BURST:
            self._woke(now)
        self._last = now
        self._wake_bytes += size
        if self._mark > 1:
            due = self._timer.deadline
            if due == math.inf or due < now + 1.5 * self.window:  # moved at most every half window
                self._timer.deadline = now + 2 * self.window

    def _woke(self, now: float) -> None:
        # the wakeup that ended read the bytes that arrived between the one before it and itself
        interval, size = self._wake_interval, self._wake_bytes
        self._wake_interval, self._wake_start, self._wake_bytes = now - self._wake_start, now, 0
        if not size or not math.isfinite(interval):
            return
        if self._mark == 1:
            self._unit = size if not self._unit else (self._unit + size) / 2
        sample = size / interval
        self._rate = sample if not self._rate else (self._rate + sample) / 2
        # never more than twice what the last wakeup read: one short interval between the first
        # tokens (they often come together) cannot set a mark the stream takes windows to fill
        mark = min(MAX_MARK, 2 * size, int(self._rate * self.window - self._unit / 2))
        if mark < 1.5 * self._unit:
            mark = 1
        if (mark == 1 and self._mark > 1) or abs(mark - self._mark) * 4 > self._unit:  # a change worth a call
            self._set(mark)

    def _set(self, mark: int) -> None:
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
        except OSError:  # the connection is gone: the reader hears of it
            mark = 1
        self._mark = mark

    async def watch(self) -> None:
        """Drop the mark to one byte when no read came for 1.5 to 2 windows (a stream slowing down)."""
        while True:
            with self._timer:
                await trio.sleep_forever()
            self._timer = trio.CancelScope()
            if self._mark > 1:
                self._set(1)
                self.released += 1


class _Unbatched:
    __slots__ = ()
    mark = 1
    released = 0

    def received(self, size: int) -> None:
        pass


@asynccontextmanager
async def batched_reads(response: Any, window: float) -> AsyncIterator[ReadBatching | _Unbatched]:
    """Batch the reads of a streamed httpx response's body (see the module): call `received` after
    each.  `window`: how long a token may wait in the kernel for others to share its wakeup
    (seconds; `Settings.stream_batch_window`).  Nothing is batched when it is 0 or no TCP socket is
    under the response."""
    sock = _socket_of(response)
    if not window > 0 or sock is None or not math.isfinite(window):
        yield _Unbatched()
        return
    batching = ReadBatching(sock, window)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(batching.watch)
            try:
                yield batching
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # what the reader raised, as it raised it (`watch` raises nothing)
        raise single_cause(group)  # noqa: B904 (its own cause is kept)


def _socket_of(response: Any) -> Any:
    network = response.extensions.get("network_stream")
    if network is None:
        return None
    try:
        sock = network.get_extra_info("socket")
    except (AssertionError, AttributeError):  # not a socket stream
        return None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock

"""A `.part` filled from the event loop: received chunks are gathered into batches, and each
batch is written (and hashed) in a worker thread while the next one arrives, so the network
and the disk work side by side.

At most one batch is being written at a time: `write_buffered` waits for the one before.
What is held in memory is what the caller buffered plus that one batch.  Every
`write_back_bytes` written, a second thread puts them on the disk (`fdatasync`) while the
writes go on: the page cache never holds the whole file dirty, and the `fsync` that ends a
download has only the tail left to do.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import outcome
import trio

from ._files import PartFile

__all__ = ["PartSink"]


class PartSink:
    """Writes a download's bytes to its `PartFile` in order, one batch in a worker thread at a time.

    A batch once handed to its thread is written whatever happens to the caller (the
    `.part` never gets a hole); the caller must `settle` before it closes the file,
    shielded when it is being cancelled.  A write that fails keeps its error (`OSError`,
    or whatever a bug raised); the next `settle`, `write_buffered` or `write_all` raises it.
    """

    def __init__(self, part: PartFile, write_back_bytes: int) -> None:
        self._part = part
        self._write_back_bytes = write_back_bytes
        self._chunks: list[bytes] = []
        #: Bytes received and not yet handed to a write.
        self.buffered = 0
        self._not_written_back = 0
        self._writing = _idle()
        self._writing_back = _idle()
        self._error: BaseException | None = None

    def add(self, chunk: bytes) -> None:
        """Buffer `chunk` for the next batch."""
        self._chunks.append(chunk)
        self.buffered += len(chunk)

    def keep_first(self, size: int) -> None:
        """Keep only the first `size` bytes of what is buffered."""
        kept: list[bytes] = []
        left = size
        for chunk in self._chunks:
            if left <= 0:
                break
            kept.append(chunk[:left])
            left -= len(kept[-1])
        self._chunks, self.buffered = kept, size - max(left, 0)

    def drop_buffered(self) -> None:
        """Forget what is buffered (it will not be written)."""
        self._chunks, self.buffered = [], 0

    async def settle(self) -> None:
        """Wait until the batch being written is written; raise the error of a failed write."""
        await self._writing.wait()
        self._raise_failure()

    async def settle_all(self) -> None:
        """`settle`, and wait for a write-back in progress: the file may then be synced and closed."""
        await self._writing.wait()
        await self._writing_back.wait()
        self._raise_failure()

    async def write_buffered(self) -> None:
        """Hand what is buffered to a worker thread once the batch before it is written.

        Returns while the batch is being written.  Raises the error of an earlier write.
        """
        await self.settle()
        if not self._chunks:
            return
        batch, size = self._chunks, self.buffered
        self.drop_buffered()
        self._writing = self._in_thread(partial(self._part.write, batch), partial(self._written, size))

    async def write_all(self) -> None:
        """Write everything buffered and return once all of it is written.

        Raises `OSError`.
        """
        await self.settle()
        batch = self._chunks
        self.drop_buffered()
        if batch:
            await trio.to_thread.run_sync(self._part.write, batch)

    def _written(self, size: int) -> None:
        self._not_written_back += size
        if self._not_written_back >= self._write_back_bytes and self._writing_back.is_set():
            self._not_written_back = 0
            self._writing_back = self._in_thread(self._part.write_back, lambda: None)

    def _in_thread(self, work: Callable[[], None], then: Callable[[], None]) -> trio.Event:
        """Run `work` in a worker thread; the event is set once it returned (and `then` ran, unless it failed)."""
        done = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def back_in_trio(result: outcome.Outcome[None]) -> None:
            if isinstance(result, outcome.Error):
                self._error = self._error or result.error
            else:
                then()
            done.set()

        def deliver(result: outcome.Outcome[None]) -> None:  # in the worker thread
            token.run_sync_soon(back_in_trio, result)

        trio.lowlevel.start_thread_soon(work, deliver)
        return done

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error


def _idle() -> trio.Event:
    event = trio.Event()
    event.set()
    return event

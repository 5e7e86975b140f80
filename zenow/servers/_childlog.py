"""A llama-server child's log file, written in batches.

llama-server prints each log line with its own write: a dozen or more per request (slot
chosen, prompt progress, timings), many of them while it reads a prompt.  Writing each
one through a worker thread took the event loop's CPU (and the GIL) from llama-server
exactly then; `ChildLog` gathers what arrives and writes it in one worker-thread call
at most every `FLUSH_INTERVAL` seconds, or at once when `MAX_PENDING` bytes wait.
A log file that cannot be written is given up (with one warning), never the draining.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

import trio

__all__ = ["FLUSH_INTERVAL", "MAX_PENDING", "ChildLog"]

log = logging.getLogger(__name__)

#: Seconds output may wait before it is written.
FLUSH_INTERVAL = 0.1
#: Bytes that may wait; past that the reader waits for the write (as it did for every line before).
MAX_PENDING = 1 << 20


class ChildLog:
    """Appends to `path`; `run()` is the writer task, `close()` writes the rest."""

    def __init__(self, path: Path, owner: str) -> None:
        self._path = path
        self._owner = owner
        self._file: BinaryIO | None = None
        self._pending: list[bytes] = []
        self._size = 0
        self._waiting = trio.Event()
        self._lock = trio.Lock()

    async def open(self, header: bytes) -> None:
        try:
            self._file = await trio.to_thread.run_sync(_open_append, self._path)
        except OSError as exc:
            log.warning("%s: cannot write %s: %s", self._owner, self._path, exc)
            return
        await self.add(header)

    async def add(self, data: bytes) -> None:
        """Queue `data`; writes at once (and waits) when `MAX_PENDING` bytes are waiting."""
        if self._file is None:
            return
        self._pending.append(data)
        self._size += len(data)
        self._waiting.set()
        if self._size >= MAX_PENDING:
            await self.flush()

    async def run(self) -> None:
        """Write what waits, `FLUSH_INTERVAL` after it began to wait; forever (cancel it)."""
        while True:
            await self._waiting.wait()
            await trio.sleep(FLUSH_INTERVAL)
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:  # one write at a time: the file keeps the output's order
            if not self._pending or self._file is None:
                return
            data = b"".join(self._pending)
            self._pending.clear()
            self._size = 0
            self._waiting = trio.Event()
            try:
                await trio.to_thread.run_sync(self._file.write, data)
            except OSError as exc:
                log.warning("%s: stopped writing %s: %s", self._owner, self._path, exc)
                await self._close_file()

    async def close(self) -> None:
        """Write what waits and close the file (shielded: it runs while its owner stops)."""
        with trio.CancelScope(shield=True):
            await self.flush()
            await self._close_file()

    async def _close_file(self) -> None:
        file, self._file = self._file, None
        self._pending.clear()
        if file is not None:
            try:
                await trio.to_thread.run_sync(file.close)
            except OSError:
                pass


def _open_append(path: Path) -> BinaryIO:
    return open(path, "ab", buffering=0)  # every write goes straight to the file

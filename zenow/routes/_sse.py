"""Answering with a stream of Server-Sent Events whose producer must stop when the client goes."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable

import trio
from quart import Response

__all__ = ["sse_response"]


def sse_response(frames: AsyncIterator[bytes], cancel: Callable[[], None]) -> Response:
    """A `text/event-stream` answer sending `frames` (each a whole event), never cut by a timeout.

    `cancel` is called when the body ends, however it ends: at the last frame, when the
    client disconnects mid-stream, and when the client is gone before the body is first
    read (then the body's generator never runs; dropping it calls `cancel` all the same).
    """

    async def body() -> AsyncIterator[bytes]:
        try:
            async for frame in frames:
                yield frame
        finally:
            cancel()  # on disconnect: stop the producer (and the generation upstream) now
            close = getattr(frames, "aclose", None)
            if close is not None:
                with trio.CancelScope(shield=True):
                    await close()

    stream = body()
    weakref.finalize(stream, cancel)
    response = Response(stream, status=200, headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    response.timeout = None  # a reply on a CPU can take minutes; never cut it
    return response

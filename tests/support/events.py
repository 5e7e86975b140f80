"""Reading zenow's live events (`/api/events`, SSE) in tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import trio


class EventReader:
    """The events (and ping comments) of one SSE response, read as they come."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()
        self.comments: list[str] = []

    async def next(self, timeout: float = 10) -> dict:
        data: list[str] = []
        with trio.fail_after(timeout):
            async for line in self._lines:
                if line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif not line and data:
                    return json.loads("\n".join(data))
        raise EOFError("the event stream ended")

    async def first(self, wanted: Callable[[dict], bool], timeout: float = 10) -> dict:
        """The next event `wanted` accepts; those before it are passed over."""
        with trio.fail_after(timeout):
            while not wanted(event := await self.next(timeout)):
                pass
        return event

    async def rest(self, timeout: float = 10) -> list[dict]:
        events = []
        with trio.fail_after(timeout):
            while True:
                try:
                    events.append(await self.next(timeout))
                except EOFError:
                    return events


@asynccontextmanager
async def subscribed(client: httpx.AsyncClient, **params: str) -> AsyncIterator[tuple[EventReader, dict]]:
    """An SSE subscription and its snapshot (it is subscribed once the snapshot arrived)."""
    async with client.stream("GET", "/api/events", params=params) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        reader = EventReader(response)
        yield reader, await reader.next()

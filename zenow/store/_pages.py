"""A tiny read cache of the newest page of the session list, kept by the store's handle.

Front ends poll `GET /api/sessions` far more often than anything is written; answering
it again from the database costs a message to the store actor, a worker thread and the
shaping of the answer, about three quarters of the request.  The handle keeps the first
page's answer, as its caller shaped it, until the store announces any write.

Correctness rests on two rules, both about the one store actor serving requests in order:

* the actor calls `invalidate` after every write to the database, whether it succeeded or
  not, before it answers the writer or serves the next request (also when the writer
  stopped waiting), so no read started after a write returned can see the cache of before;
* a read keeps its answer only when no write settled between asking and keeping it
  (`generation`): an answer read before a write cannot be kept after it.

Callers that ask while a read of the same page is under way wait for it instead of
reading again (after a write, every polling front end asks at once), but only when no
write settled since that read was asked, and they take its answer from the cache: what
they return is always an answer the two rules let stand.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar, cast

import trio

__all__ = ["PageCache"]

T = TypeVar("T")


class _Reading:
    """A read of one page under way, asked under `generation`."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.done = trio.Event()


class PageCache:
    """Answers kept per key (at most `capacity`, the oldest forgotten first) until `invalidate`."""

    def __init__(self, capacity: int = 4) -> None:
        self._capacity = capacity
        self._answers: OrderedDict[Hashable, Any] = OrderedDict()
        self._reading: dict[Hashable, _Reading] = {}
        #: How many writes settled: an answer read under an older generation is not kept.
        self.generation = 0

    async def answer(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """The answer kept for `key`; else `await read()` (which must not answer None), kept when
        no write settled meanwhile.  While a read of `key` is under way (asked since the last
        write), wait for it and look again rather than read too.  Raises what `read` raises."""
        while True:
            kept = self._answers.get(key)
            if kept is not None:
                return cast(T, kept)
            under_way = self._reading.get(key)
            if under_way is None or under_way.generation != self.generation:
                break
            await under_way.done.wait()  # then kept; or it failed, or a write came: look again
        reading = self._reading[key] = _Reading(self.generation)
        try:
            answer = await read()
            self.keep(key, answer, reading.generation)
            return answer
        finally:
            if self._reading.get(key) is reading:
                del self._reading[key]
            reading.done.set()

    def get(self, key: Hashable) -> Any | None:
        """The answer kept for `key`, or None."""
        return self._answers.get(key)

    def keep(self, key: Hashable, answer: Any, generation: int) -> None:
        """Keep `answer` for `key` if it was read under the current `generation`."""
        if generation != self.generation or answer is None:
            return
        self._answers[key] = answer
        self._answers.move_to_end(key)
        while len(self._answers) > self._capacity:
            self._answers.popitem(last=False)

    def invalidate(self) -> None:
        """The database may have changed: forget every answer, and refuse those being read."""
        self.generation += 1
        self._answers.clear()

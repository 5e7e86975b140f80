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
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["PageCache"]


class PageCache:
    """Answers kept per key (at most `capacity`, the oldest forgotten first) until `invalidate`."""

    def __init__(self, capacity: int = 4) -> None:
        self._capacity = capacity
        self._answers: OrderedDict[Hashable, Any] = OrderedDict()
        #: How many writes settled: an answer read under an older generation is not kept.
        self.generation = 0

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

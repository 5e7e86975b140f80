"""Idle unload: a mode's llama-server that has served nothing for `keep_alive` seconds is stopped.

`Activity` is what uses one mode's server: the requests holding it now (the `ModelGate`'s
leases: `/api/chat` streams and `/v1` requests, each from before it reads the endpoint
until its upstream request has ended, so an open stream keeps the mode busy however long
it runs) and when the last one began or ended.  A load, a parameter change and every start
that reaches `running` count as activity too (`touch`), so each resets the timer.

`watch_idle` runs in the server actor's nursery: it sleeps until the mode has been idle for
`keep_alive` seconds (`-1`: never), then asks the actor to stop the child.  The actor
decides in its own mailbox (`idle_expired` again: a request may have come meanwhile), and
publishes `stopped` with reason `idle` *before* it stops the child, so a request that comes
during the stop sees `stopped` and wakes the server instead of leasing a dying one.  The
next request for the mode starts the same model again (`ServerHandle.wake`) and waits for it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import trio

__all__ = ["IDLE", "Activity", "idle_expired", "watch_idle"]

#: The `reason` of a server stopped for idleness.
IDLE = "idle"


class Activity:
    """What uses one mode's server (see the module docstring).  Never blocks, never raises."""

    def __init__(self) -> None:
        #: Requests holding the running model now.
        self.busy = 0
        #: When the last request began or ended, or the timer was last reset (trio's clock).
        self.last = -math.inf
        self._changed = trio.Event()

    def touch(self) -> None:
        """Reset the idle timer: something used the server, was loaded, or its parameters changed."""
        self.last = trio.current_time()
        self.notify()

    def begin(self) -> None:
        """A request takes hold of the server."""
        self.busy += 1
        self.touch()

    def end(self) -> None:
        """A request lets go of the server."""
        self.busy -= 1
        self.touch()

    def notify(self) -> None:
        """Wake the watcher to look again (the server's state or parameters changed)."""
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        """Return at the next `touch`, `begin`, `end` or `notify`."""
        await self._changed.wait()


def idle_expired(activity: Activity, keep_alive: float) -> bool:
    """Whether a server with `activity` has been idle for `keep_alive` seconds (never when it is -1)."""
    if keep_alive < 0 or activity.busy:
        return False
    return trio.current_time() >= activity.last + keep_alive


async def watch_idle(activity: Activity, keep_alive: Callable[[], float], running: Callable[[], bool],
                     stop: Callable[[], Awaitable[None]]) -> None:
    """Call `stop()` each time a `running()` server has been idle for `keep_alive()` seconds.

    Runs until cancelled.  `stop` only asks: whoever owns the server checks `idle_expired` again.
    """
    while True:
        seconds = keep_alive()
        if seconds < 0 or activity.busy or not running():
            await activity.changed()
            continue
        if idle_expired(activity, seconds):
            await stop()
            with trio.move_on_after(1.0):  # the owner publishes `stopped`, or declines and is asked again
                await activity.changed()
            continue
        with trio.move_on_at(activity.last + seconds):
            await activity.changed()

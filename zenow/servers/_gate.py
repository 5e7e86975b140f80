"""One mode's traffic: leases on the running model, and switches that wait for them.

A `/v1` request holds a `Lease` on the model that answers it from before it reads the
endpoint until its upstream request has ended (a stream included).  A request naming
another model switches: from then on new requests wait, the switch waits for the
leases in flight to end (at most `switch_wait` seconds, else `ModelBusy`, 409), loads
the model through the mode's server actor, and lets the waiting requests go on.  So
one `/v1` request never cuts another by switching the model under it.

`/api/chat` streams take a lease too, so a `/v1` request naming another llm model
waits for them and never cuts a chat.  (`POST /api/models/load` switches at once, as the
spec's load always has.)

Leases are the mode's activity (`_idle`): while one is held the server is never stopped
for idleness, and a request that finds the server stopped for idleness starts the same
model again (`ServerHandle.wake`) and waits for it before taking its lease.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from ..errors import ModelBusy, ModelLoadFailed, ModelNotLoaded, ServerStartFailed

if TYPE_CHECKING:
    from ._actor import ServerHandle, ServerStatus

__all__ = ["DEFAULT_SWITCH_WAIT", "Lease", "ModelGate"]

#: Seconds a switch of model waits for the requests in flight before answering 409.
DEFAULT_SWITCH_WAIT = 30.0


class Lease:
    """A request's hold on the running model; `release()` is idempotent and never blocks."""

    def __init__(self, gate: ModelGate) -> None:
        self._gate: ModelGate | None = gate

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._released()


class ModelGate:
    """The leases and the switch of one mode (see the module docstring)."""

    def __init__(self, server: ServerHandle, switch_wait: float) -> None:
        self._server = server
        self._switch_wait = switch_wait
        self._leases = 0
        self._idle = trio.Event()
        self._idle.set()
        self._switch_done: trio.Event | None = None

    @property
    def leases(self) -> int:
        """Requests holding the running model now (a snapshot)."""
        return self._leases

    def a_slot_to_spare(self) -> bool:
        """Whether the running model has a slot free beside the caller's request (which holds a
        lease): fewer other requests hold it (generating, or waiting in llama-server's queue) than
        it has slots (`parallel`).  Work that may go to waste (reading a next turn ahead) waits for
        such a slot rather than hold up a request."""
        others = self._leases - 1
        return others < int(self._server.parameters().get("parallel") or 1)

    async def enter(self, wanted: str | None) -> tuple[ServerStatus, Lease]:
        """A lease on `wanted` running (or on whatever runs, when None), and its status.

        Loads `wanted` first when another model runs, and starts the model again when it
        was stopped for idleness.  Raises `ModelNotLoaded` (nothing
        runs and nothing was named), `ModelBusy` (the switch waited `switch_wait` seconds
        for requests in flight), `ModelLoadFailed`, or what `ServerHandle.load` raises
        (`ModelNotFound`, `InvalidModelFile`).  Cancelling it takes no lease; a load it
        started goes on in the server actor.
        """
        while True:
            if self._switch_done is not None:
                await self._switch_done.wait()
                continue
            status = self._server.status()
            if wanted in (None, status.model_name) and self._server.asleep():
                await self._server.wake()  # stopped for idleness: start it again (or wait for that), look again
                continue
            if wanted is None:
                if status.endpoint is None:
                    raise ModelNotLoaded(
                        f"No {self._server.mode} model is running ({status.status}): name one in `model`, "
                        f"or load one with POST /api/models/load"
                    )
                return status, self._lease()
            if status.endpoint is not None and status.model_name == wanted:
                return status, self._lease()
            return await self._switch(wanted, status)

    async def _switch(self, wanted: str, current: ServerStatus) -> tuple[ServerStatus, Lease]:
        done = self._switch_done = trio.Event()
        try:
            with trio.move_on_after(self._switch_wait) as waited:
                await self._idle.wait()
            if waited.cancelled_caught:
                raise ModelBusy(
                    f"The {self._server.mode} model {current.model_name!r} is still answering {self._leases} "
                    f"request(s); switching to {wanted!r} waited {self._switch_wait:g} s. Try again when they end"
                )
            try:
                status = await self._server.load(wanted, None)
            except ServerStartFailed as exc:
                raise ModelLoadFailed(f"Model {wanted!r} did not start: {exc}") from exc
        finally:
            self._switch_done = None
            done.set()
        if status.endpoint is None or status.model_name != wanted:
            raise ModelLoadFailed(f"Model {wanted!r} did not start: {status.error_message or status.status}")
        return status, self._lease()

    def _lease(self) -> Lease:
        if self._leases == 0:
            self._idle = trio.Event()
        self._leases += 1
        self._server.activity.begin()
        return Lease(self)

    def _released(self) -> None:
        self._leases -= 1
        self._server.activity.end()
        if self._leases == 0:
            self._idle.set()

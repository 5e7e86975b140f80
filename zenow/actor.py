"""The actor primitive: a mailbox, typed request/reply, and supervision.

An actor is an object whose state only its own task touches.  Other code holds
an `ActorRef`: the send side of the actor's mailbox.  `ActorRef.call(op, *args)`
sends a `Request` carrying a one-shot reply channel; the actor task runs
`await op(actor, *args)` and sends back the outcome, which `call` returns or
raises in the caller, keeping the original exception type.  Requests are served
one at a time, in order, so an actor never races with itself.

A `Supervisor` runs actors in its nursery and restarts one that crashes.  The
mailbox belongs to the supervisor, not to an actor instance, so a restarted
actor keeps serving the same `ActorRef` and requests queued during a restart are
served by the new instance.

Restart policy (one for every actor, see `RestartPolicy`):

* an operation that raises a `ZenowError` is an answer, not a crash: the caller
  gets the error and the actor goes on;
* any other exception, in an operation or in one of the actor's own background
  tasks, crashes the actor: the caller (if any) gets `ActorCrashed` naming it, the
  supervisor logs the traceback and starts a fresh instance after a backoff
  (0.1 s doubling to 5 s), at most `max_restarts` times within `window` seconds;
* past that, a *critical* actor (the store) stops zenow with its error, since
  nothing works without it; a non-critical actor stays down and calls to it
  raise `ActorUnavailable`, while the rest of zenow keeps serving.  A critical
  actor that fails its very first start stops zenow at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

import outcome
import trio

from .errors import ActorCrashed, ActorUnavailable, ZenowError, single_cause

__all__ = ["Actor", "ActorHealth", "ActorRef", "Request", "RestartPolicy", "Supervisor"]

log = logging.getLogger(__name__)

A = TypeVar("A", bound="Actor")
T = TypeVar("T")
P = ParamSpec("P")

MAILBOX_CAPACITY = 64


@dataclass(frozen=True, slots=True)
class Request:
    """One message to an actor: run `operation(actor, *args)` and reply on `reply`."""

    operation: Callable[..., Awaitable[Any]]
    args: tuple[Any, ...]
    reply: trio.MemorySendChannel[outcome.Outcome[Any]] | None


class ActorRef(Generic[A]):
    """The address of an actor: the only way other code reaches it."""

    def __init__(self, name: str, send: trio.MemorySendChannel[Request]) -> None:
        self.name = name
        self._send = send

    async def call(
        self, operation: Callable[Concatenate[A, P], Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run `operation(actor, *args, **kwargs)` inside the actor and return its result.

        Raises whatever the operation raised, or `ActorUnavailable` when the actor
        is stopped or crashed while serving this request.  Cancelling the caller
        abandons the reply; the actor still completes the operation.
        """
        reply_send, reply_recv = trio.open_memory_channel[outcome.Outcome[Any]](1)
        with reply_recv:
            try:
                await self._send.send(Request(_bound(operation, kwargs), args, reply_send))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise ActorUnavailable(f"The {self.name} is not running") from None
            try:
                result = await reply_recv.receive()
            except trio.EndOfChannel:
                raise ActorUnavailable(f"The {self.name} stopped while serving the request") from None
        value: T = result.unwrap()
        return value

    async def tell(
        self, operation: Callable[Concatenate[A, P], Awaitable[Any]], *args: P.args, **kwargs: P.kwargs
    ) -> None:
        """Queue `operation(actor, *args, **kwargs)` without waiting for its result; waits for
        room in the mailbox.  Raises `ActorUnavailable` if the actor is gone."""
        try:
            await self._send.send(Request(_bound(operation, kwargs), args, None))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ActorUnavailable(f"The {self.name} cannot take messages") from None

    def cast(
        self, operation: Callable[Concatenate[A, P], Awaitable[Any]], *args: P.args, **kwargs: P.kwargs
    ) -> None:
        """Queue `operation(actor, *args, **kwargs)` without waiting for it (used by an actor's
        own tasks).

        Raises `ActorUnavailable` if the mailbox is closed or full.
        """
        try:
            self._send.send_nowait(Request(_bound(operation, kwargs), args, None))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            raise ActorUnavailable(f"The {self.name} cannot take messages") from None


def _bound(operation: Callable[..., Awaitable[Any]], kwargs: dict[str, Any]) -> Callable[..., Awaitable[Any]]:
    """`operation` with its keyword arguments bound, so a `Request` carries positional ones only."""
    return functools.partial(operation, **kwargs) if kwargs else operation


class Actor:
    """Base class: subclasses add state and operations (async methods taking `self`).

    `setup` runs inside the actor's nursery before it serves requests (it may start
    background tasks with `self.nursery`); `teardown` runs when the actor ends,
    shielded from cancellation, whether it ended by shutdown or by crash.
    """

    nursery: trio.Nursery
    #: The actor's own address, for messages its background tasks send it.
    self_ref: ActorRef[Any]

    async def setup(self) -> None:
        return None

    async def teardown(self) -> None:
        return None

    async def run(
        self,
        inbox: trio.MemoryReceiveChannel[Request],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve `inbox` until it is closed; started means ready to serve."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await self.setup()
                task_status.started()
                async for request in inbox:
                    await self._serve(request)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.teardown()

    async def _serve(self, request: Request) -> None:
        crash: Exception | None = None
        try:
            result: outcome.Outcome[Any] = outcome.Value(await request.operation(self, *request.args))
        except ZenowError as exc:
            result = outcome.Error(exc)
            if request.reply is None:
                log.warning("%s: %s", type(self).__name__, exc)
        except Exception as exc:  # noqa: BLE001 - any other failure is a bug, reported to the caller
            # A bug, not an answer: the caller gets its own error naming it, and we
            # crash so the supervisor restarts us with fresh state.
            crash = exc
            result = outcome.Error(ActorCrashed(f"Internal error in {type(self).__name__}: "
                                                f"{type(exc).__name__}: {exc}"))
        except BaseException:
            # Cancelled (shutdown, or a crash elsewhere in this actor) is not the caller's:
            # closing the reply channel makes the call raise ActorUnavailable.
            if request.reply is not None:
                request.reply.close()
            raise
        if request.reply is not None:
            with request.reply:
                try:
                    request.reply.send_nowait(result)
                except (trio.BrokenResourceError, trio.WouldBlock):
                    pass  # the caller went away; the work is done all the same
        if crash is not None:
            raise crash


@dataclass
class RestartPolicy:
    """How a supervisor restarts a crashed actor (see the module docstring)."""

    max_restarts: int = 5
    window: float = 60.0
    backoff_initial: float = 0.1
    backoff_max: float = 5.0


class ActorHealth:
    """Which supervised actors have given up, and why; shared by every supervisor of a zenow.

    Written only by supervisors; read by the health probe.
    """

    def __init__(self) -> None:
        self._down: dict[str, str] = {}

    def gave_up(self, name: str, reason: str) -> None:
        self._down[name] = reason

    def down(self) -> dict[str, str]:
        """The actors that stay down, each with the error that stopped it (a copy)."""
        return dict(self._down)


class Supervisor:
    """Runs actors in a nursery and restarts the ones that crash."""

    def __init__(self, nursery: trio.Nursery, policy: RestartPolicy | None = None,
                 health: ActorHealth | None = None) -> None:
        self._nursery = nursery
        self._policy = policy or RestartPolicy()
        self._health = health if health is not None else ActorHealth()

    async def start(
        self, name: str, factory: Callable[[], A], *, critical: bool = False
    ) -> ActorRef[A]:
        """Start an actor built by `factory` and return its address once it is ready.

        `factory` is called again for every restart.  Raises what the first start
        raised, when the actor cannot start at all.
        """
        send, recv = trio.open_memory_channel[Request](MAILBOX_CAPACITY)
        ref: ActorRef[A] = ActorRef(name, send)
        await self._nursery.start(self._supervise, ref, factory, recv, critical)
        return ref

    async def _supervise(
        self,
        ref: ActorRef[Any],
        factory: Callable[[], Actor],
        inbox: trio.MemoryReceiveChannel[Request],
        critical: bool,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        name = ref.name
        policy = self._policy
        restarts: list[float] = []
        backoff = policy.backoff_initial
        started = False
        try:
            while True:
                actor = factory()
                actor.self_ref = ref
                try:
                    async with trio.open_nursery() as nursery:
                        await nursery.start(actor.run, inbox)
                        if not started:
                            started = True
                            task_status.started()
                    return  # the inbox was closed: a clean stop
                except BaseException as raised:
                    exc, other = _split_crash(raised)
                    if exc is None:
                        raise  # cancelled, nothing crashed
                    if other is not None:  # crashed while being cancelled: report it, obey the cancel
                        log.error("%s crashed while stopping", name, exc_info=exc)
                        raise other from None
                    if not started:
                        # could never serve: report why to whoever started us
                        raise single_cause(exc) from None
                    now = trio.current_time()
                    restarts = [t for t in restarts if now - t < policy.window]
                    if not restarts:
                        backoff = policy.backoff_initial
                    if len(restarts) >= policy.max_restarts:
                        log.error("%s crashed %d times in %.0f s; giving up", name,
                                  len(restarts) + 1, policy.window, exc_info=exc)
                        last = single_cause(exc)
                        self._health.gave_up(name, f"crashed {len(restarts) + 1} times in {policy.window:.0f} s; "
                                                   f"last: {type(last).__name__}: {last}")
                        if critical:
                            raise
                        return  # closing the inbox below makes every call raise ActorUnavailable
                    log.error("%s crashed; restarting in %.1f s", name, backoff, exc_info=exc)
                    restarts.append(now)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, policy.backoff_max)
        finally:
            _refuse_pending(inbox)
            inbox.close()


def _split_crash(raised: BaseException) -> tuple[Exception | None, BaseException | None]:
    """Separate what crashed (Exceptions) from the rest (Cancelled, KeyboardInterrupt...)."""
    if isinstance(raised, BaseExceptionGroup):
        crashed, rest = raised.split(Exception)
        return crashed, rest
    if isinstance(raised, Exception):
        return raised, None
    return None, raised


def _refuse_pending(inbox: trio.MemoryReceiveChannel[Request]) -> None:
    """Close the reply channels of requests nobody will serve, so their callers wake up."""
    while True:
        try:
            request = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return
        if request.reply is not None:
            request.reply.close()

"""The event hub: what happens in zenow, told to whoever listens, never waiting for them.

Actors announce changes with `EventHub.publish(event)`: a plain function call that
never blocks, never raises and costs one small append per interested subscriber, so
a publisher (an actor serving requests one at a time) is never slowed by a listener.
Routes (`/api/events`, `/api/ws`) hold a `Subscription` each::

    subscription = await hub.open(types)      # subscribed, then the snapshot first
    async for event in subscription:          # ends on overflow, close or shutdown
        send(event.text)

Guarantees:

* **Snapshot first.**  `open` subscribes *before* it asks the snapshot provider for the
  current state (every mode's server status, the downloads in progress), then puts that
  `Snapshot` in front of whatever was published meanwhile: nothing is missed, and an
  event that raced with the snapshot is at worst told twice (each one carries the
  whole state of its subject, so telling it twice is harmless).
* **Bounded.**  Each subscriber has a buffer of `buffer` events (default
  `SUBSCRIBER_BUFFER`).  A publish that finds it full drops whatever that subscriber
  had not taken yet, leaves it one `Overflow` event and unsubscribes it: it receives
  the overflow, then its iteration ends.  No other subscriber and no publisher notices.
* **Paced progress.**  `DownloadProgress` events are admitted at most once per
  `PROGRESS_INTERVAL` seconds per download URL (4 a second), except the final state of a
  download (`completed` or `failed`), which always goes; the hub fills in `speed` (bytes
  per second, smoothed) from the events it saw.  Publishers may therefore publish on
  every chunk received.  The newest event held back is not lost: `release_held_progress`
  (a task the service runs) sends it once its interval has passed, unless a newer one
  went first, so a download that stalls right after a burst shows where it stalled.
* **In order.**  One publisher's events reach every subscriber in the order published.

Every event is a JSON object with `type` and `ts` (seconds since the epoch, a float);
`Event.text` is that object serialized once, whatever the number of subscribers.

Types, for `?types=` (a type, or the part before its dot: `session` takes every
`session.*`): `status`, `download`, `model.registered`, `parameters`,
`session.created`, `session.renamed`, `session.deleted`, `session.message`,
`session.cleared`.  `snapshot` and `overflow` are sent whatever the filter.

Publishing is for trio tasks of zenow's one event loop (not for worker threads).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, Protocol

import trio

from .errors import InvalidRequest, ZenowError
from .settings import MODES, Mode

if TYPE_CHECKING:
    from .store import DownloadRecord, MessageInfo, ModelInfo, SessionInfo

__all__ = [
    "EVENT_TYPES",
    "PROGRESS_INTERVAL",
    "SUBSCRIBER_BUFFER",
    "DownloadProgress",
    "Event",
    "EventHub",
    "MessageAdded",
    "MessagesCleared",
    "ModelRegistered",
    "Overflow",
    "ParametersChanged",
    "ServerStatusEvent",
    "SessionCreated",
    "SessionDeleted",
    "SessionRenamed",
    "Snapshot",
    "SnapshotProvider",
    "Subscription",
    "TypeFilter",
    "current_state",
    "parse_types",
]

log = logging.getLogger(__name__)

#: Events a subscriber may have waiting before it is dropped (one `overflow` event, then the end).
SUBSCRIBER_BUFFER = 256
#: Least seconds between two progress events of one download (the final state always goes).
PROGRESS_INTERVAL = 0.25
#: Downloads whose pace the hub remembers at once (a download that never ended is forgotten first).
_PACED_DOWNLOADS_MAX = 1024


# ---------------------------------------------------------------- the events


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something that happened; subclasses name their `type` and add their fields."""

    type: ClassVar[str] = "event"
    #: When it happened: seconds since the epoch.
    ts: float = field(default_factory=time.time)

    def payload(self) -> dict[str, Any]:
        """The event's own fields, JSON-ready (everything but `type` and `ts`)."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "ts": self.ts, **self.payload()}

    @cached_property
    def text(self) -> str:
        """The JSON text of the event, computed once for every subscriber."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":"))

    @cached_property
    def sse(self) -> bytes:
        """The event as one Server-Sent Events frame, blank line included."""
        return b"data: " + self.text.encode() + b"\n\n"


class _ServerStatusLike(Protocol):
    @property
    def status(self) -> str: ...
    @property
    def model_name(self) -> str | None: ...
    @property
    def model_path(self) -> str | None: ...
    @property
    def error_message(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def backend_url(self) -> str | None: ...
    @property
    def token_counting(self) -> str | None: ...


@dataclass(frozen=True, kw_only=True)
class ServerStatusEvent(Event):
    """A mode's server changed state; the fields of `GET /api/server/status` plus `mode`
    (and, for a mode served by a remote backend, `backend_url` and `token_counting`)."""

    type: ClassVar[str] = "status"
    mode: str
    status: str
    model_name: str | None = None
    model_path: str | None = None
    error_message: str | None = None
    #: Why it is `stopped` ("idle", "shutdown"), else None.
    reason: str | None = None
    backend_url: str | None = None
    token_counting: str | None = None

    @classmethod
    def of(cls, mode: str, status: _ServerStatusLike) -> ServerStatusEvent:
        """The event for `status` (a `zenow.servers.ServerStatus`) of `mode`."""
        return cls(mode=mode, status=status.status, model_name=status.model_name,
                   model_path=status.model_path, error_message=status.error_message, reason=status.reason,
                   backend_url=status.backend_url,
                   token_counting=status.token_counting if status.backend_url is not None else None)

    def state(self) -> dict[str, Any]:
        """The status as `GET /api/server/status` shows it."""
        return status_state(self)

    def payload(self) -> dict[str, Any]:
        return {"mode": self.mode, **self.state()}


def status_state(status: _ServerStatusLike) -> dict[str, Any]:
    """A mode's status as `GET /api/server/status` shows it (the spec's section 4), plus `reason`
    when it is `stopped`; a mode served by a remote backend adds `backend_url` and `token_counting`."""
    state = {"status": status.status, "model_name": status.model_name, "model_path": status.model_path,
             "is_running": status.status == "running", "error_message": status.error_message}
    if status.reason is not None:
        state["reason"] = status.reason
    if status.backend_url is not None:
        state |= {"backend_url": status.backend_url, "token_counting": status.token_counting}
    return state


@dataclass(frozen=True, kw_only=True)
class DownloadProgress(Event):
    """Where a download stands; the fields of `GET /api/models/download/status` plus
    `mode`, `speed` (bytes per second, None until known) and `eta` (seconds, derived)."""

    type: ClassVar[str] = "download"
    #: As answers show it: credentials replaced by `***`.
    url: str
    filename: str
    mode: str
    status: str
    downloaded: int
    total: int | None
    progress: float
    error: str | None = None
    speed: float | None = None

    @classmethod
    def of(cls, record: DownloadRecord, *, speed: float | None = None) -> DownloadProgress:
        """The event for a download's record (credentials in its URL and error hidden)."""
        # Imported here: zenow.downloads imports the store, which imports this module.
        from .downloads import progress_percent, redact_text, redact_url

        return cls(url=redact_url(record.url), filename=record.filename, mode=record.mode, status=record.status,
                   downloaded=record.downloaded, total=record.total, progress=progress_percent(record),
                   error=None if record.error is None else redact_text(record.error), speed=speed)

    @property
    def final(self) -> bool:
        """Whether the download ended (`completed` or `failed`)."""
        return self.status != "downloading"

    @property
    def eta(self) -> float | None:
        """Seconds left at the current speed, when both the size and the speed are known."""
        if self.final or self.total is None or not self.speed:
            return None
        return round(max(0, self.total - self.downloaded) / self.speed, 1)

    def payload(self) -> dict[str, Any]:
        return {"url": self.url, "filename": self.filename, "mode": self.mode, "status": self.status,
                "downloaded": self.downloaded, "total": self.total, "progress": self.progress,
                "speed": None if self.speed is None else round(self.speed, 1), "eta": self.eta,
                "error": self.error}


@dataclass(frozen=True, kw_only=True)
class ModelRegistered(Event):
    """A model was added to the registry, or its path, source or size changed."""

    type: ClassVar[str] = "model.registered"
    model: ModelInfo

    def payload(self) -> dict[str, Any]:
        m = self.model
        return {"model": {"id": m.id, "name": m.name, "path": m.path, "is_downloaded": m.is_downloaded,
                          "mode": m.mode, "size": m.size}}


@dataclass(frozen=True, kw_only=True)
class ParametersChanged(Event):
    """A mode's parameters were updated; `parameters` holds all of them after the change."""

    type: ClassVar[str] = "parameters"
    mode: str
    parameters: Mapping[str, Any]
    requires_restart: bool

    def payload(self) -> dict[str, Any]:
        return {"mode": self.mode, "parameters": dict(self.parameters), "requires_restart": self.requires_restart}


@dataclass(frozen=True, kw_only=True)
class SessionCreated(Event):
    type: ClassVar[str] = "session.created"
    session: SessionInfo

    def payload(self) -> dict[str, Any]:
        s = self.session
        return {"session": {"id": s.id, "session_name": s.session_name, "created_at": s.created_at,
                            "updated_at": s.updated_at, "message_count": s.message_count,
                            "total_tokens": s.total_tokens}}


@dataclass(frozen=True, kw_only=True)
class SessionRenamed(Event):
    type: ClassVar[str] = "session.renamed"
    session_id: int
    session_name: str

    def payload(self) -> dict[str, Any]:
        return {"session_id": self.session_id, "session_name": self.session_name}


@dataclass(frozen=True, kw_only=True)
class SessionDeleted(Event):
    type: ClassVar[str] = "session.deleted"
    session_id: int

    def payload(self) -> dict[str, Any]:
        return {"session_id": self.session_id}


@dataclass(frozen=True, kw_only=True)
class MessageAdded(Event):
    """A message was saved to a session (by a client, or by chat: the user's turn, then the reply)."""

    type: ClassVar[str] = "session.message"
    message: MessageInfo

    def payload(self) -> dict[str, Any]:
        m = self.message
        return {"session_id": m.session_id,
                "message": {"id": m.id, "session_id": m.session_id, "role": m.role, "content": m.content,
                            "token_count": m.token_count, "created_at": m.created_at}}


@dataclass(frozen=True, kw_only=True)
class MessagesCleared(Event):
    type: ClassVar[str] = "session.cleared"
    session_id: int

    def payload(self) -> dict[str, Any]:
        return {"session_id": self.session_id}


@dataclass(frozen=True, kw_only=True)
class Snapshot(Event):
    """The state a new subscriber starts from: each mode's server status, the downloads in progress."""

    type: ClassVar[str] = "snapshot"
    servers: tuple[ServerStatusEvent, ...] = ()
    downloads: tuple[DownloadProgress, ...] = ()

    def only(self, types: TypeFilter) -> Snapshot:
        """The parts of the snapshot `types` asks for (the others empty)."""
        return replace(
            self,
            servers=self.servers if wanted(ServerStatusEvent.type, types) else (),
            downloads=self.downloads if wanted(DownloadProgress.type, types) else (),
        )

    def payload(self) -> dict[str, Any]:
        downloads = [d.payload() for d in self.downloads]
        return {"servers": {s.mode: s.state() for s in self.servers}, "downloads": downloads}


@dataclass(frozen=True, kw_only=True)
class Overflow(Event):
    """The last event of a subscriber that fell `buffer` events behind: it is disconnected."""

    type: ClassVar[str] = "overflow"
    buffer: int

    def payload(self) -> dict[str, Any]:
        return {"buffer": self.buffer,
                "detail": f"this subscriber fell more than {self.buffer} events behind and was disconnected; "
                          "reconnect for a fresh snapshot"}


#: The types a subscriber may ask for (`?types=`); `snapshot` and `overflow` always come.
EVENT_TYPES: tuple[str, ...] = tuple(e.type for e in (
    ServerStatusEvent, DownloadProgress, ModelRegistered, ParametersChanged,
    SessionCreated, SessionRenamed, SessionDeleted, MessageAdded, MessagesCleared,
))
_ALWAYS = frozenset({Snapshot.type, Overflow.type})

#: The types a subscriber takes: None for all, else names of types or of their category
#: (the part before the dot).
TypeFilter = frozenset[str] | None


def wanted(event_type: str, types: TypeFilter) -> bool:
    """Whether a subscriber asking for `types` takes events of `event_type`."""
    return (types is None or event_type in _ALWAYS or event_type in types
            or event_type.split(".", 1)[0] in types)


def parse_types(text: str | None) -> TypeFilter:
    """The filter in `?types=status,download`; None (everything) when absent or empty.

    Raises `InvalidRequest` (param `types`) naming an unknown type.
    """
    if text is None or not text.strip():
        return None
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    known = set(EVENT_TYPES) | {t.split(".", 1)[0] for t in EVENT_TYPES}
    unknown = sorted(names - known)
    if unknown:
        raise InvalidRequest(f"types: unknown event type {unknown[0]!r}; known: {', '.join(sorted(known))}",
                             param="types")
    return names


# ---------------------------------------------------------------- subscriptions


class Subscription:
    """One subscriber's view of the hub: a bounded queue of events, read with `receive`.

    Close it when done (`with subscription:` or `close()`); it ends by itself after an
    overflow or when the hub closes.  Meant for one reading task.
    """

    __slots__ = ("_hub", "_lot", "_open", "_queue", "buffer", "overflowed", "types")

    def __init__(self, hub: EventHub | None, types: TypeFilter, buffer: int) -> None:
        self.types = types
        self.buffer = buffer
        #: Whether it was dropped for falling `buffer` events behind.
        self.overflowed = False
        self._hub = hub
        self._queue: deque[Event] = deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._open = hub is not None

    async def receive(self) -> Event:
        """The next event; waits for one.

        Raises `trio.EndOfChannel` once the subscription ended (closed, overflowed, or the
        hub closed) and every event queued before that was received.  Cancelling the wait
        loses nothing.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._queue:
            if not self._open:
                raise trio.EndOfChannel
            await self._lot.park()
        event = self._queue.popleft()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return event

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Unsubscribe and forget what was queued; `receive` then raises `EndOfChannel`.  Idempotent."""
        if self._hub is not None:
            self._hub._forget(self)
        self._open = False
        self._queue.clear()
        self._lot.unpark_all()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # called by the hub only

    def _first(self, event: Event) -> None:
        self._queue.appendleft(event)
        self._lot.unpark_all()

    def _offer(self, event: Event) -> bool:
        """Queue `event`; False when the buffer was full (it then holds one `Overflow` and ended)."""
        if len(self._queue) >= self.buffer:
            self._queue.clear()
            self._queue.append(Overflow(buffer=self.buffer))
            self.overflowed = True
            self._end()
            return False
        self._queue.append(event)
        self._lot.unpark_all()
        return True

    def _end(self) -> None:
        """No more events: what is queued is still received, then `EndOfChannel`."""
        self._hub = None
        self._open = False
        self._lot.unpark_all()


# ---------------------------------------------------------------- the hub

#: Builds the snapshot a new subscriber starts from (see `current_state`).
SnapshotProvider = Callable[[], Awaitable[Snapshot]]


@dataclass
class _Pace:
    at: float
    downloaded: int
    speed: float | None


class _ProgressPacer:
    """Admits at most one progress event per download per interval (final states always)
    and fills in the speed seen between two admitted events, smoothed."""

    def __init__(self, interval: float, clock: Callable[[], float]) -> None:
        self._interval = interval
        self._clock = clock
        self._paces: OrderedDict[str, _Pace] = OrderedDict()
        #: The newest event held back per download, until its interval has passed.
        self._held: dict[str, DownloadProgress] = {}

    def admit(self, event: DownloadProgress) -> DownloadProgress | None:
        now = self._clock()
        pace = self._paces.get(event.url)
        self._held.pop(event.url, None)
        if pace is None:
            if not event.final:
                self._paces[event.url] = _Pace(now, event.downloaded, None)
                if len(self._paces) > _PACED_DOWNLOADS_MAX:
                    forgotten, _ = self._paces.popitem(last=False)
                    self._held.pop(forgotten, None)
            return event
        elapsed = now - pace.at
        if not event.final and elapsed < self._interval:
            self._held[event.url] = event
            return None
        speed = pace.speed
        if elapsed > 0 and event.downloaded >= pace.downloaded:
            rate = (event.downloaded - pace.downloaded) / elapsed
            speed = rate if speed is None else 0.5 * rate + 0.5 * speed
        if event.final:
            del self._paces[event.url]
        else:
            pace.at, pace.downloaded, pace.speed = now, event.downloaded, speed
        return event if event.speed is not None else replace(event, speed=speed)

    def next_due(self) -> float | None:
        """Seconds until the first held event may go (0 when one may go now); None when none is held."""
        if not self._held:
            return None
        now = self._clock()
        return max(0.0, min(self._paces[url].at + self._interval - now for url in self._held))

    def take_due(self) -> list[DownloadProgress]:
        """The held events whose interval has passed, no longer held (publish them)."""
        now = self._clock()
        due = [e for url, e in self._held.items() if now - self._paces[url].at >= self._interval]
        for event in due:
            del self._held[event.url]
        return due


async def _no_snapshot() -> Snapshot:
    return Snapshot()


class EventHub:
    """Where actors publish events and routes subscribe to them (see the module docstring)."""

    def __init__(self, *, buffer: int | None = None, progress_interval: float = PROGRESS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        #: Each new subscriber's buffer, in events.
        self.buffer = SUBSCRIBER_BUFFER if buffer is None else buffer
        #: Subscribers dropped for overflowing, since the start.
        self.dropped = 0
        self._subscribers: dict[Subscription, None] = {}
        self._pacer = _ProgressPacer(progress_interval, clock)
        self._snapshot: SnapshotProvider = _no_snapshot
        self._closed = False
        self._progress_held = trio.Event()

    @property
    def subscribers(self) -> int:
        """How many subscriptions are open."""
        return len(self._subscribers)

    def set_snapshot_provider(self, provider: SnapshotProvider) -> None:
        """Use `provider` for the snapshot `open` puts first (it may raise; see `open`)."""
        self._snapshot = provider

    def publish(self, event: Event) -> None:
        """Tell every subscriber that takes `event`'s type.  Never blocks, never raises.

        A subscriber whose buffer is full gets `Overflow` instead and is dropped.  A
        `DownloadProgress` may be held back by the pacing (see the module docstring).
        """
        if isinstance(event, DownloadProgress):
            paced = self._pacer.admit(event)
            if paced is None:
                self._progress_held.set()
                return
            event = paced
        overflowed: list[Subscription] = []
        for subscription in self._subscribers:
            if wanted(event.type, subscription.types) and not subscription._offer(event):
                overflowed.append(subscription)
        for subscription in overflowed:
            del self._subscribers[subscription]
            self.dropped += 1
            log.info("an event subscriber fell %d events behind: dropped", subscription.buffer)

    async def release_held_progress(self) -> NoReturn:
        """Forever: publish each held-back `DownloadProgress` once its interval has passed (see
        the module docstring).  The service runs it for as long as the hub serves."""
        while True:
            wait = self._pacer.next_due()
            if wait is None:
                await self._progress_held.wait()
                self._progress_held = trio.Event()
                continue
            await trio.sleep(wait)
            for event in self._pacer.take_due():
                self.publish(event)

    def subscribe(self, types: TypeFilter = None, *, buffer: int | None = None) -> Subscription:
        """A subscription to every event published from now on that `types` takes (no snapshot).

        After `close()`, the subscription is already ended.
        """
        size = self.buffer if buffer is None else buffer
        if size < 1:
            raise ValueError("a subscriber's buffer holds at least one event")
        if self._closed:
            return Subscription(None, types, size)
        subscription = Subscription(self, types, size)
        self._subscribers[subscription] = None
        return subscription

    async def open(self, types: TypeFilter = None, *, buffer: int | None = None) -> Subscription:
        """`subscribe`, then put the current state first: a `Snapshot` (the parts `types` takes).

        When the provider fails with a `ZenowError` (an actor is down) the snapshot is
        empty and the subscription goes on.  Cancelling closes the subscription.
        """
        subscription = self.subscribe(types, buffer=buffer)
        try:
            try:
                snapshot = await self._snapshot()
            except ZenowError as exc:
                log.warning("event snapshot: %s", exc)
                snapshot = Snapshot()
        except BaseException:
            subscription.close()
            raise
        subscription._first(snapshot.only(types))
        return subscription

    def close(self) -> None:
        """End every subscription (each still receives what was queued) and take no new ones.

        For shutdown: event streams end instead of holding their connections open.
        """
        self._closed = True
        subscribers, self._subscribers = self._subscribers, {}
        for subscription in subscribers:
            subscription._end()

    def _forget(self, subscription: Subscription) -> None:
        self._subscribers.pop(subscription, None)


# ---------------------------------------------------------------- the snapshot of zenow


class _ServerHandleLike(Protocol):
    def status(self) -> _ServerStatusLike: ...


class _DownloadsLike(Protocol):
    async def all(self) -> list[DownloadRecord]: ...


async def current_state(servers: Mapping[Mode, _ServerHandleLike], downloads: _DownloadsLike) -> Snapshot:
    """zenow's snapshot: every mode's server status (`ServerHandle.status()`) and the downloads
    in progress (`Downloads.all()`; none when the download actor is down)."""
    statuses = tuple(ServerStatusEvent.of(mode, servers[mode].status()) for mode in MODES if mode in servers)
    records: Iterable[DownloadRecord]
    try:
        records = await downloads.all()
    except ZenowError as exc:
        log.warning("event snapshot without downloads: %s", exc)
        records = ()
    running = tuple(DownloadProgress.of(r) for r in records if r.status == "downloading")
    return Snapshot(servers=statuses, downloads=running)

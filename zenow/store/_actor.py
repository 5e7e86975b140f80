"""The store actor: owns the one sqlite3 connection; `Store` is its handle."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import trio

from .. import metrics
from ..actor import Actor, ActorRef
from ..errors import InvalidRequest, StorageFull, StoreError, StoreReadOnly
from ..events import (
    EventHub,
    MessageAdded,
    MessagesCleared,
    ModelRegistered,
    SessionCreated,
    SessionDeleted,
    SessionRenamed,
)
from . import _queries as q
from ._pages import PageCache
from ._records import DownloadRecord, MessageInfo, ModelDetails, ModelInfo, SessionInfo

__all__ = ["Store", "StoreActor"]

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class StoreActor(Actor):
    """Owns the database connection; runs each query in a worker thread, one at a time."""

    def __init__(self, path: Path, busy_timeout_ms: int = q.BUSY_TIMEOUT_MS) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None

    async def setup(self) -> None:
        try:
            self._conn = await trio.to_thread.run_sync(q.open_database, self._path, self._busy_timeout_ms)
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            raise StoreError(f"Cannot open the database {self._path}: {exc}") from exc

    async def teardown(self) -> None:
        if self._conn is not None:
            await trio.to_thread.run_sync(self._conn.close)
            self._conn = None

    async def execute(self, query: Callable[..., T], *args: Any) -> T:
        """Run `query(connection, *args)` in a worker thread.

        Raises `InvalidRequest` when the arguments are values SQLite cannot hold (an
        integer beyond 64 bits, text that is not valid Unicode): that is the caller's
        error, and the transaction was rolled back, so the actor goes on.  Raises
        `StoreError` when the database itself fails.
        """
        assert self._conn is not None
        started = time.perf_counter()
        try:
            return await trio.to_thread.run_sync(query, self._conn, *args)
        except OverflowError as exc:
            raise InvalidRequest(f"a number is out of range: {exc}") from exc
        except UnicodeEncodeError as exc:
            raise InvalidRequest("text is not valid Unicode (it holds a lone surrogate)") from exc
        except sqlite3.Error as exc:
            raise _store_error(exc) from exc
        finally:
            metrics.store_query(getattr(query, "__name__", "query"), time.perf_counter() - started)

    async def write(self, query: Callable[..., T], settled: Callable[[], None], announce: Callable[[T], None],
                    *args: Any) -> T:
        """`execute`, then `settled()` whatever happened (the database may have changed), then
        `announce(result)` when it succeeded; both here in the actor, before it answers or serves
        the next request: changes are announced in the order they were made, and even when the
        caller stopped waiting for the answer.

        `settled` and `announce` must not block; should `announce` raise, the error is logged and
        the change stands.  Raises what `execute` raises; then nothing is announced.
        """
        try:
            result = await self.execute(query, *args)
        finally:
            settled()
        try:
            announce(result)
        except Exception:  # a bug in an event must not crash the store: zenow stops without it
            log.exception("announcing a change failed")
        return result


def _store_error(exc: sqlite3.Error) -> StoreError:
    """The domain error for a database failure; the transaction was rolled back, nothing half-written."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return StorageFull(f"The disk is full: the database cannot grow ({exc}); nothing was saved")
    if code is not None and code & 0xFF == sqlite3.SQLITE_READONLY:
        return StoreReadOnly(f"The database is read-only ({exc}); nothing was saved, reading still works")
    return StoreError(f"Database error: {exc}")


class Store:
    """Typed access to the store actor.  Every method raises `StoreError` when the
    database fails, and `ActorUnavailable` when the store is down.

    Changes to sessions, messages and the model registry are published on `events`
    (`session.*`, `model.registered`) once written.  Every change goes through `_write`,
    which is what keeps `session_page`'s cache true (see `zenow.store._pages`).
    """

    def __init__(self, ref: ActorRef[StoreActor], events: EventHub | None = None) -> None:
        self._ref = ref
        self._events = events if events is not None else EventHub()
        self._first_pages = PageCache()

    @property
    def events(self) -> EventHub:
        """The hub this store announces its changes on (a hub nobody listens to, when none was given)."""
        return self._events

    async def _run(
        self, query: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        if kwargs:
            raise TypeError("store queries take positional arguments only")
        return await self._ref.call(StoreActor.execute, query, *args)

    async def _write(
        self, query: Callable[Concatenate[sqlite3.Connection, P], T], announce: Callable[[T], None],
        *args: P.args, **kwargs: P.kwargs,
    ) -> T:
        if kwargs:
            raise TypeError("store queries take positional arguments only")
        return await self._ref.call(StoreActor.write, query, self._first_pages.invalidate, announce, *args)

    # sessions (raise SessionNotFound for an unknown id)
    async def create_session(self, name: str) -> SessionInfo:
        return await self._write(q.create_session, lambda s: self._events.publish(SessionCreated(session=s)), name)

    async def get_session(self, session_id: int) -> SessionInfo:
        return await self._run(q.get_session, session_id)

    async def list_sessions(self, limit: int, offset: int) -> tuple[list[SessionInfo], int]:
        """A page of sessions, the most recently updated first, and how many there are."""
        return await self._run(q.list_sessions, limit, offset)

    async def session_page(self, limit: int, offset: int, shape: Callable[[list[SessionInfo], int], T]) -> T:
        """`shape(sessions, total)` of `list_sessions(limit, offset)`.

        The first page's answer (offset 0) is kept per `(limit, shape)` until the next write to
        the store, so asking again neither reaches the actor nor shapes again, and callers asking
        at once share one read: `shape` must be a pure function of its arguments (its answer is
        shared by every caller) that is not None.
        """
        if offset != 0:
            return shape(*await self._run(q.list_sessions, limit, offset))

        async def read() -> T:
            return shape(*await self._run(q.list_sessions, limit, 0))

        return await self._first_pages.answer((limit, shape), read)

    async def rename_session(self, session_id: int, name: str) -> None:
        await self._write(
            q.rename_session,
            lambda _: self._events.publish(SessionRenamed(session_id=session_id, session_name=name)),
            session_id, name,
        )

    async def delete_session(self, session_id: int) -> None:
        await self._write(q.delete_session, lambda _: self._events.publish(SessionDeleted(session_id=session_id)),
                          session_id)

    async def add_message(self, session_id: int, role: str, content: str, token_count: int) -> MessageInfo:
        return await self._write(q.add_message, lambda m: self._events.publish(MessageAdded(message=m)),
                                 session_id, role, content, token_count)

    async def get_messages(self, session_id: int, limit: int | None) -> tuple[list[MessageInfo], int]:
        return await self._run(q.get_messages, session_id, limit)

    async def newest_messages(self, session_id: int, before_id: int | None, count: int) -> list[MessageInfo]:
        return await self._run(q.newest_messages, session_id, before_id, count)

    async def session_with_newest_messages(self, session_id: int, count: int) -> tuple[SessionInfo, list[MessageInfo]]:
        """The session and up to `count` of its newest messages (newest first), in one call."""
        return await self._run(q.session_with_newest_messages, session_id, count)

    async def clear_messages(self, session_id: int) -> None:
        await self._write(q.clear_messages, lambda _: self._events.publish(MessagesCleared(session_id=session_id)),
                          session_id)

    # models
    async def register_model(
        self, mode: str, name: str, path: str, source_url: str | None = None, size: int | None = None,
        details: ModelDetails | None = None,
    ) -> ModelInfo:
        """Add a model to the registry, or update the one of that name in that mode.

        `details` is what its GGUF header says (read by the caller, which refuses a file
        whose header does not read); None keeps what was stored.
        """
        return await self._write(q.register_model, lambda m: self._events.publish(ModelRegistered(model=m)),
                                 mode, name, path, source_url, size, details)

    async def list_models(self, mode: str | None) -> list[ModelInfo]:
        return await self._run(q.list_models, mode)

    async def find_model(self, mode: str, name: str) -> ModelInfo | None:
        return await self._run(q.find_model, mode, name)

    async def current_model(self, mode: str) -> ModelInfo | None:
        return await self._run(q.current_model, mode)

    async def set_current_model(self, mode: str, model_id: int | None) -> None:
        await self._run(q.set_current_model, mode, model_id)

    # parameters
    async def get_parameters(self, mode: str) -> dict[str, Any]:
        return await self._run(q.get_parameters, mode)

    async def set_parameters(self, mode: str, values: dict[str, Any]) -> None:
        await self._run(q.set_parameters, mode, values)

    # downloads
    async def save_download(self, record: DownloadRecord) -> None:
        await self._run(q.save_download, record)

    async def delete_download(self, url: str) -> None:
        await self._run(q.delete_download, url)

    async def list_downloads(self) -> list[DownloadRecord]:
        return await self._run(q.list_downloads)

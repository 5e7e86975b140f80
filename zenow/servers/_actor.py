"""The server actor: one per mode, owning that mode's llama-server child.

States (the spec's): not_started → starting → running; a child that exits while
it should run, or never becomes healthy, gives `error` (with the exit code and
why it failed, from the last lines it printed) and is restarted with exponential
backoff (`Settings.restart_backoff` doubling to 30 s) until it fails
`MAX_FAST_FAILURES` times without staying up for `STABLE_AFTER` seconds; then it
stays in `error` until the next load.

The actor is the only writer of its state, and its mailbox only ever waits for
the child: loads, parameter updates and restarts are messages handled one at a
time, so concurrent loads for one mode are serialized while the modes never wait
for each other.  Long work stays out of the mailbox: `ServerHandle.load` finds or
downloads the model and reads its GGUF header in the caller's task, and the
restart timer reads the header in its own task, before the actor is asked to
decide.  What routes read is a published snapshot (`ServerBoard`), so status
answers at once even while a load is in progress.

A load never costs the mode the model it serves unless the new one runs: a file
whose header is broken, or that would not fit in memory, is refused before the
running child is touched; a file llama-server fails to start gets the previous
model started again, and is not made the mode's current model.

A mode whose `backend_url` parameter is set runs no child: a `RemoteMonitor` (`_remote`)
health-checks that backend and the actor publishes what it finds; clearing the URL
starts the mode's current model locally again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import trio

from .. import metrics
from ..actor import Actor, ActorRef
from ..errors import (
    BackendInUse,
    BackendUnavailable,
    InvalidModelFile,
    InvalidRequest,
    ModelNotFound,
    ModelWakeFailed,
    ServerNotRunning,
    ServerStartFailed,
    StoreError,
    ZenowError,
)
from ..events import EventHub, ParametersChanged, ServerStatusEvent
from ..settings import Mode, Settings
from ..store import ModelInfo, Store
from . import _memory
from ._binary import find_llama_server
from ._childlog import ChildLog
from ._client import upstream_client
from ._gate import DEFAULT_SWITCH_WAIT, ModelGate
from ._gguf import GGUFInfo, mode_problem, model_details, read_gguf_info
from ._idle import IDLE, Activity, idle_expired, watch_idle
from ._keys import new_key
from ._params import (
    BACKEND_KEYS,
    SERVER_KEYS,
    Bounds,
    ParameterUpdate,
    context_warning,
    defaults_for,
    effective_context,
    restore_stored,
    validate_update,
)
from ._reason import failure_reason
from ._remote import KEY_SET_PARAM, Backend, BackendKeys, RemoteMonitor, RemoteState, split_key_change
from ._spawn import spawn_owned, terminate, wait_exit

if TYPE_CHECKING:  # a type only: downloads must stay importable from anywhere servers is
    from ..downloads import Downloads

__all__ = ["ServerActor", "ServerBoard", "ServerHandle", "ServerStatus"]

log = logging.getLogger(__name__)

Status = Literal["not_started", "starting", "running", "error", "stopped"]

MAX_FAST_FAILURES = 5
STABLE_AFTER = 60.0
BACKOFF_MAX = 30.0
TAIL_LINES = 40
#: How long an exited child's last output may take to be read before its exit is reported.
DRAIN_AFTER_EXIT = 1.0


@dataclass(frozen=True)
class ServerStatus:
    """A snapshot of one mode's server, as the spec shows it (plus where to reach it)."""

    status: Status = "not_started"
    model_name: str | None = None
    model_path: str | None = None
    error_message: str | None = None
    #: http://127.0.0.1:PORT while running; not part of the spec's shape.
    endpoint: str | None = None
    #: The context (tokens) the running child was started with: `context_size`, or less when
    #: the model was trained for less (see `_params`); not part of the spec's shape.
    context_size: int | None = None
    #: Why it is `stopped`: "idle" (after `keep_alive` seconds without a request; the next one
    #: starts it again) or "shutdown"; None otherwise.
    reason: str | None = None
    #: The remote backend serving the mode (`backend_url`), or None for a local child.
    backend_url: str | None = None
    #: How the server counts tokens: its own `/tokenize`, or zenow's estimate (a backend without one).
    token_counting: Literal["tokenize", "estimate"] = "tokenize"
    #: The `Authorization` header requests to `endpoint` carry; never shown, logged or published.
    authorization: str | None = field(default=None, repr=False, compare=False)

    def auth_headers(self) -> dict[str, str]:
        """The headers every request to `endpoint` must carry (its key)."""
        return {"Authorization": self.authorization} if self.authorization else {}

    def not_running(self, message: str) -> ServerNotRunning:
        """The error for a request this server cannot serve now: `message`, or for a remote
        backend why it does not answer (`BackendUnavailable`, 503)."""
        if self.backend_url is None:
            return ServerNotRunning(message)
        return BackendUnavailable(self.error_message or f"backend {self.backend_url} is {self.status}")

    @property
    def is_running(self) -> bool:
        return self.status == "running"


@dataclass
class ServerBoard:
    """Where a server actor publishes its state for readers; only the actor writes it."""

    status: ServerStatus = field(default_factory=ServerStatus)
    parameters: dict[str, Any] = field(default_factory=dict)
    #: What the header of the model the mode runs (or last tried to run) says.
    model_info: GGUFInfo | None = None
    #: Whether `context_size` may exceed what that model was trained for (`allow_context_overflow`).
    context_overflow: bool = False
    #: Where each status is announced (set by the server actor), and the mode it is of.
    events: EventHub | None = None
    mode: str = ""
    #: What uses the server (written by the requests through the gate; see `_idle`).
    activity: Activity = field(default_factory=Activity)
    #: Whether the model stopped for idleness is being started again for a request.
    waking: bool = False

    def publish(self, status: ServerStatus) -> None:
        self.status = status
        if status.status == "running":
            self.activity.touch()  # a start (a load, a wake, a restart) resets the idle timer
        else:
            self.activity.notify()
        if self.events is not None:
            self.events.publish(ServerStatusEvent.of(self.mode, status))


@dataclass(frozen=True)
class _Model:
    """A model file, checked: its registry entry and what its header says."""

    record: ModelInfo
    info: GGUFInfo

    @property
    def name(self) -> str:
        return self.record.name


@dataclass
class _Child:
    generation: int
    model: _Model
    n_ctx: int
    port: int
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    exited: trio.Event = field(default_factory=trio.Event)
    stopping: bool = False
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    #: Set when everything the child printed is in `tail` (its output reached its end).
    drained: trio.Event = field(default_factory=trio.Event)
    running_since: float | None = None
    #: The child's API key (given to it in its environment).
    key: str = field(default="", repr=False)

    def reason(self) -> str:
        """Why it failed, from the last lines it printed ("" when it printed nothing)."""
        return failure_reason(self.tail)


def free_port() -> int:
    """A port on 127.0.0.1 free right now (the child binds it next; a race is handled as a failed start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


class ServerActor(Actor):
    """Owns one mode's llama-server child, its status and its parameters.

    `memory` says how many bytes a new child may use (default: MemAvailable from
    /proc/meminfo); `cores` how many CPU cores zenow may use (default: its affinity).
    """

    def __init__(self, mode: Mode, settings: Settings, store: Store, board: ServerBoard,
                 *, memory: _memory.MemoryProbe | None = None, cores: int | None = None) -> None:
        self.mode = mode
        self.settings = settings
        self.store = store
        self.board = board
        board.events, board.mode = store.events, mode
        self._memory = memory if memory is not None else _memory.mem_available
        self._cores = cores if cores is not None else _memory.usable_cores()
        self._child: _Child | None = None
        #: What this mode runs, or last tried to run (the model its parameters are bounded by).
        self._model: _Model | None = None
        self._generation = 0
        self._failures: list[float] = []
        self._params: dict[str, Any] = {}
        self._context_overflow = False
        self._log_path = settings.logs_dir / f"llama-server-{mode}.log"
        #: The remote backend's monitor while `backend_url` is set (then no child runs).
        self._remote: RemoteMonitor | None = None
        self._backend_keys = BackendKeys(settings.home / "secrets")
        self._backend_key: str | None = None
        self._http = upstream_client(httpx.Timeout(2.0))

    # ------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        self.nursery.start_soon(
            watch_idle, self.board.activity, lambda: float(self._params.get("keep_alive", -1)),
            self._idle_stoppable, partial(self.self_ref.tell, ServerActor._stop_idle))
        await self._restore_parameters()
        await self._register_folder()
        current = await self.store.current_model(self.mode)
        if current is None and self.mode == "llm" and self.settings.default_llm is not None:
            current = await self._register_default(self.settings.default_llm)
        if self._params["backend_url"]:
            self._use_backend()
        elif current is not None:
            self.board.publish(ServerStatus("starting", current.name, current.path))
            self.nursery.start_soon(self._check_then, ServerActor._boot, self._generation, current, 0.0)
        else:
            self.board.publish(ServerStatus())

    async def teardown(self) -> None:
        # The child's own task terminates and reaps it when the nursery is cancelled.
        await self._http.aclose()
        if self.board.status.status in ("starting", "running"):
            self.board.publish(replace(self.board.status, status="stopped", endpoint=None, context_size=None,
                                       reason="shutdown"))

    async def _restore_parameters(self) -> None:
        """The stored parameters, each checked as an update would be; a bad one is logged and
        its default used, so get_param always answers and a child never gets a bad flag."""
        defaults = defaults_for(self.mode, self.settings.system_prompt, self._cores)
        try:
            stored = await self.store.get_parameters(self.mode)
        except ZenowError as exc:
            log.error("%s: cannot read the stored parameters (%s); using the defaults", self.mode, exc)
            stored = {}
        params, overflow, problems = restore_stored(self.mode, defaults, stored, Bounds(self._cores))
        for problem in problems:
            log.warning("%s parameters: %s", self.mode, problem)
        self._params, self._context_overflow = params, overflow
        self._backend_key = await self._backend_keys.read(self.mode)
        self.board.parameters, self.board.context_overflow = self._shown_parameters(), overflow

    async def _register_folder(self) -> None:
        """Register the GGUF files in this mode's folder, each with what its header says; a file
        whose header does not read is refused (logged), one already registered unchanged is not read."""
        folder = self.settings.mode_dir(self.mode)
        files = await trio.to_thread.run_sync(
            lambda: sorted((p, p.stat().st_size) for p in folder.glob("*.gguf") if p.is_file())
        )
        known = {m.path: m for m in await self.store.list_models(self.mode)}
        for path, size in files:
            same = known.get(str(path))
            if same is not None and same.details is not None and same.size == size:
                details = same.details
            else:
                try:
                    details = model_details(await trio.to_thread.run_sync(read_gguf_info, path))
                except InvalidModelFile as exc:
                    log.warning("%s: not registering %s: %s", self.mode, path.name, exc)
                    continue
            await self.store.register_model(self.mode, path.stem, str(path), None, size, details)

    async def _register_default(self, path: Path) -> ModelInfo | None:
        try:
            info = await trio.to_thread.run_sync(read_gguf_info, path)
        except ZenowError as exc:
            log.error("--default-llm: %s", exc)
            return None
        if problem := mode_problem(info, "llm"):
            log.error("--default-llm: %s cannot chat: %s", path, problem)
            return None
        resolved = await trio.to_thread.run_sync(path.resolve)
        model = await self.store.register_model("llm", path.stem, str(resolved), None, info.file_size,
                                                model_details(info))
        await self.store.set_current_model("llm", model.id)
        log.info("registered %s as the default llm model", path)
        return model

    # ------------------------------------------------------------ operations (messages)

    async def load(self, model: ModelInfo, info: GGUFInfo) -> ServerStatus:
        """Make `model` (whose header said `info`) the running model of this mode.

        Raises `BackendInUse` while a remote backend serves the mode, `InvalidRequest`
        when it would not fit in memory (nothing changed), or
        `ServerStartFailed` when llama-server did not come up with it; then the model
        that ran before runs again (the error says so), or, when none ran, the mode
        reports why in its status.  Either way `model` is not made current.
        """
        if self._remote is not None:
            raise _backend_in_use(self.mode, self._params["backend_url"])
        current = self.board.status
        if current.status == "running" and current.model_path == model.path:
            await self.store.set_current_model(self.mode, model.id)
            return current  # already serving this model: nothing to restart
        await self._switch_to(_Model(model, info), fall_back=True)
        return self.board.status

    async def update_parameters(self, changes: dict[str, Any]) -> bool:
        """Apply a partial update; restart a live server if a server parameter changed.

        Returns whether a server parameter changed (`requires_restart`); a change of the
        backend (`backend_url`, `backend_model`, `backend_api_key`) switches the mode to it,
        or back to its local child.  Raises `InvalidRequest` naming the bad keys, or saying
        the model would not fit in memory with them; then nothing changed.
        """
        rest, key_change = split_key_change(changes)
        if key_change is not None and not rest:  # only the key
            update = ParameterUpdate(dict(self._params), {}, self._context_overflow)
        else:
            update = validate_update(self.mode, self._params, rest, self._bounds(), self._context_overflow)
        changed = {k for k in update.parameters if update.parameters[k] != self._params.get(k)}
        new_key = key_change is not None and key_change.key != self._backend_key
        backend_changed = bool(changed & BACKEND_KEYS) or (new_key and bool(update.parameters["backend_url"]))
        if update.parameters["backend_url"]:  # no child to restart: only a change of backend counts
            requires_restart = backend_changed
        else:
            requires_restart = (backend_changed or bool(changed & SERVER_KEYS)
                                or update.context_overflow != self._context_overflow)
        # the model that runs, or that failed with the old parameters (a fix may let it start)
        child = self._child
        model = child.model if child is not None else self._model if self.board.status.status == "error" else None
        restart = requires_restart and not backend_changed and model is not None and self.board.status.status in (
            "starting", "running", "error")
        if restart and model is not None:
            n_ctx = effective_context(update.parameters["context_size"], model.info.context_length,
                                      update.context_overflow)
            await self._check_memory(model, n_ctx, param="context_size", params=update.parameters)
        if key_change is not None:
            try:
                await self._backend_keys.write(self.mode, key_change.key)
            except OSError as exc:
                raise StoreError(f"backend_api_key: could not be stored: {exc.strerror or exc}") from None
        if update.stored:
            try:
                await self.store.set_parameters(self.mode, update.stored)
            except BaseException:
                if key_change is not None:  # nothing changed: the key file as it was
                    with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                        await self._backend_keys.write(self.mode, self._backend_key)
                raise
        if key_change is not None:
            self._backend_key = key_change.key
        self._params, self._context_overflow = update.parameters, update.context_overflow
        self.board.parameters, self.board.context_overflow = self._shown_parameters(), update.context_overflow
        self.store.events.publish(ParametersChanged(mode=self.mode, parameters=self._shown_parameters(),
                                                    requires_restart=requires_restart))
        if backend_changed:
            await self._apply_backend()
        if restart and model is not None:
            try:
                await self._switch_to(model, fall_back=False)
            except ZenowError as exc:
                log.error("%s: restart after a parameter change failed: %s", self.mode, exc)
        return requires_restart

    async def _boot(self, generation: int, model: ModelInfo, info: GGUFInfo) -> None:
        """Start the current model at zenow start; a failure is reported in the status."""
        if generation != self._generation:
            return  # a load came first
        try:
            await self._switch_to(_Model(model, info), fall_back=False)
        except ZenowError as exc:
            log.error("%s: could not start %s: %s", self.mode, model.name, exc)
            if self._child is None:
                self._fail(model, str(exc))

    async def _child_exited(self, child: _Child) -> None:
        if child is not self._child or child.stopping:
            return  # an old child, or one we stopped on purpose
        message = f"llama-server exited unexpectedly with code {child.exit_code}"
        if reason := child.reason():
            message += f": {reason}"
        log.error("%s: %s", self.mode, message)
        metrics.server_crashed(self.mode)
        self._child = None
        self._fail(child.model.record, message)
        self._schedule_retry(child.model.record, child.running_since)

    async def _retry(self, generation: int, model: ModelInfo, info: GGUFInfo) -> None:
        if generation != self._generation:
            return  # a load or parameter change happened meanwhile
        metrics.server_restarting(self.mode)
        try:
            await self._start(_Model(model, info))
        except ServerStartFailed:
            self._schedule_retry(model, None)

    async def wake(self) -> ServerStatus:
        """Start the mode's model again after an idle stop (see `_idle`); the status once it runs.

        Raises `ServerStartFailed` (the status then says why).  Any other state is answered as it is.
        """
        status = self.board.status
        if status.status == "stopped" and status.reason == IDLE and self._model is not None and self._child is None:
            log.info("%s: starting %s again for a request", self.mode, self._model.name)
            self.board.waking = True  # requests that come meanwhile queue their wake behind this one
            try:
                await self._start(self._model)
            finally:
                self.board.waking = False
        return self.board.status

    def _idle_stoppable(self) -> bool:
        """Whether a local child runs that idleness may stop (a remote backend is not zenow's to stop)."""
        return self.board.status.status == "running" and self._remote is None

    async def _stop_idle(self) -> None:
        """Stop the child after `keep_alive` seconds without a request; the model stays the mode's."""
        status = self.board.status
        if not self._idle_stoppable() or not idle_expired(self.board.activity, float(self._params["keep_alive"])):
            return
        log.info("%s: %s idle for %s s: stopping it", self.mode, status.model_name, self._params["keep_alive"])
        # `stopped` before the child stops: a request arriving meanwhile wakes it, never leases a dying one
        self.board.publish(replace(status, status="stopped", endpoint=None, context_size=None, reason=IDLE))
        await self._stop_child()
        metrics.server_idle_stopped(self.mode)

    async def _refused(self, generation: int, model: ModelInfo, message: str) -> None:
        """The file of a model to (re)start failed its check: retrying cannot help."""
        if generation == self._generation:
            log.error("%s: %s", self.mode, message)
            self._fail(model, message)


    # ------------------------------------------------------------ a remote backend

    def _shown_parameters(self) -> dict[str, Any]:
        """The parameters as get_param answers them: the backend's key only as whether one is set."""
        return {**self._params, KEY_SET_PARAM: self._backend_key is not None}

    async def _apply_backend(self) -> None:
        """Serve the mode from `backend_url` (a new monitor), or, once it is cleared, start
        its current model locally again."""
        if self._remote is not None:
            self._remote.stop()
            self._remote = None
        self._generation += 1  # a boot or a restart of a local child still pending is void
        if self._params["backend_url"]:
            await self._stop_child()
            self._use_backend()
            return
        current = await self.store.current_model(self.mode)
        if current is None:
            self.board.publish(ServerStatus())
            return
        self._failures.clear()
        self.board.publish(ServerStatus("starting", current.name, current.path))
        self.nursery.start_soon(self._check_then, ServerActor._boot, self._generation, current, 0.0)

    def _use_backend(self) -> None:
        backend = Backend(self._params["backend_url"], self._params["backend_model"], self._backend_key)
        log.info("%s: served by the backend %s", self.mode, backend.url)
        self._remote = RemoteMonitor(backend, lambda state: self._publish_remote(backend, state),
                                     self.settings.backend_check_interval)
        self.nursery.start_soon(self._remote.run)

    def _publish_remote(self, backend: Backend, state: RemoteState) -> None:
        running = state.status == "running"
        self.board.publish(ServerStatus(
            state.status, state.model_name, backend.url, state.error_message,
            endpoint=backend.url if running else None, context_size=state.context_size,
            backend_url=backend.url, token_counting="tokenize" if state.tokenize else "estimate",
            authorization=backend.authorization,
        ))

    # ------------------------------------------------------------ internals

    def _fail(self, model: ModelInfo, message: str) -> None:
        """Publish `error` for `model`, saying why."""
        self.board.publish(ServerStatus("error", model.name, model.path, message))

    def _bounds(self) -> Bounds:
        if self._model is None:
            return Bounds(self._cores)
        return Bounds(self._cores, self._model.name, self._model.info.context_length)

    def _context_for(self, model: _Model) -> int:
        return effective_context(self._params["context_size"], model.info.context_length, self._context_overflow)

    async def _check_then(self, operation: Callable[[ServerActor, int, ModelInfo, GGUFInfo], Awaitable[None]],
                          generation: int, model: ModelInfo, delay: float) -> None:
        """After `delay`, read `model`'s header in this task, then ask the actor to run
        `operation(generation, model, info)`, or `_refused` when the file is not loadable."""
        await trio.sleep(delay)
        try:
            info = await trio.to_thread.run_sync(read_gguf_info, Path(model.path))
        except InvalidModelFile as exc:
            await self.self_ref.tell(ServerActor._refused, generation, model, str(exc))
            return
        await self.self_ref.tell(operation, generation, model, info)

    def _schedule_retry(self, model: ModelInfo, running_since: float | None) -> None:
        now = trio.current_time()
        if running_since is not None and now - running_since >= STABLE_AFTER:
            self._failures.clear()
        self._failures.append(now)
        if len(self._failures) > MAX_FAST_FAILURES:
            status = self.board.status
            self.board.publish(replace(
                status, error_message=f"{status.error_message} (gave up after {len(self._failures)} failed starts)"
            ))
            return
        delay = min(self.settings.restart_backoff * 2 ** (len(self._failures) - 1), BACKOFF_MAX)
        log.info("%s: restarting in %.1f s", self.mode, delay)
        self.nursery.start_soon(self._check_then, ServerActor._retry, self._generation, model, delay)

    async def _check_memory(self, model: _Model, n_ctx: int, *, param: str,
                            params: dict[str, Any] | None = None) -> None:
        """Raise `InvalidRequest` (nothing touched) when starting `model` with `n_ctx` tokens (and
        `params`, by default the current ones) needs more memory than is available, counting
        what stopping this mode's child would free."""
        slots = self._slots(params if params is not None else self._params)
        needed = _memory.load_needs(model.info, n_ctx * slots)  # every slot has its own KV cache
        per_slot, or_parallel = (f" in each of {slots} parallel slots", " or parallel") if slots > 1 else ("", "")
        child = self._child
        pid = child.process.pid if child is not None and child.process is not None else None

        def available() -> int | None:
            free = self._memory()
            if free is None:
                return None
            return free + (_memory.anonymous_memory_of(pid) if pid is not None else 0)

        free = await trio.to_thread.run_sync(available)
        if free is not None and needed > free:
            raise InvalidRequest(
                f"Loading {model.name} with context {n_ctx}{per_slot} needs about {_gib(needed)} GiB "
                f"of memory, only {_gib(free)} GiB is available; lower context_size{or_parallel} or free some memory",
                param=param,
            )

    async def _switch_to(self, model: _Model, *, fall_back: bool) -> None:
        """Stop whatever runs, start `model`; on success make it the current model.

        Raises `InvalidRequest` (memory; nothing touched) or `ServerStartFailed`; with
        `fall_back`, the model that ran before is then started again.
        """
        await self._check_memory(model, self._context_for(model), param="model_name")
        previous = self._model if self._child is not None and self.board.status.is_running else None
        self._failures.clear()
        try:
            await self._start(model)
        except ServerStartFailed as exc:
            if not fall_back or previous is None or previous.record.path == model.record.path:
                raise
            raise ServerStartFailed(f"{exc}; {await self._fall_back_to(previous)}") from None
        await self.store.set_current_model(self.mode, model.record.id)

    async def _fall_back_to(self, previous: _Model) -> str:
        """Start `previous` again after a failed load; say how that went."""
        log.info("%s: starting %s again", self.mode, previous.name)
        try:
            await self._start(previous)
        except ServerStartFailed as exc:
            log.error("%s: %s did not start again either: %s", self.mode, previous.name, exc)
            return f"{previous.name}, which ran before, did not start again either"
        return f"{previous.name}, which ran before, is running again"

    async def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.stopping = True
            child.cancel_scope.cancel()
            await child.done.wait()

    def _slots(self, params: dict[str, Any]) -> int:
        """Conversations the child serves at once with `params`: `parallel` for llm, else one."""
        return int(params.get("parallel", 1)) if self.mode == "llm" else 1

    def _command(self, binary: str, model: _Model, port: int, n_ctx: int) -> list[str]:
        """llama-server's command line for `model` on `port`, with `n_ctx` tokens per conversation."""
        p = self._params
        # llm: `parallel` slots of `n_ctx` tokens each (llama-server splits -c evenly between them)
        slots = self._slots(p)
        argv = [
            binary, "-m", model.record.path, "--host", "127.0.0.1", "--port", str(port),
            "-c", str(n_ctx * slots), "-t", str(p["threads"]), "-ngl", str(_offloaded_layers(p)),
            "-b", str(p["batch_size"]), "--no-webui", "--metrics", "-fa", str(p["flash_attn"]),
        ]
        if p.get("rpc_servers"):  # the model's layers split across these workers and this machine
            argv += ["--rpc", ",".join(p["rpc_servers"]), "-lv", "4"]  # -lv 4: the log names the devices used
        if self.mode == "llm":
            argv += ["-np", str(slots)]  # conversations generated at once, with continuous batching
        elif self.mode == "embed":
            argv += ["--embedding", "-ub", str(p["batch_size"])]
        else:
            argv += ["--reranking", "-ub", str(p["batch_size"])]
        return argv

    def _start_timeout(self, size: int) -> float:
        gib = size / 2**30
        return self.settings.start_timeout_base + self.settings.start_timeout_per_gib * gib

    async def _start(self, model: _Model) -> None:
        """Start a child for `model` and wait until it is healthy.  Raises `ServerStartFailed`."""
        await self._stop_child()
        self._generation += 1
        self._model = model
        self.board.model_info = model.info
        record = model.record
        try:
            binary = find_llama_server(self.settings)
            await _check_workers(self._params.get("rpc_servers") or [])
        except ServerStartFailed as exc:
            self._fail(record, str(exc))
            raise
        n_ctx = self._context_for(model)
        if n_ctx < self._params["context_size"]:
            log.info("%s: %s was trained for %d tokens: starting it with that context, not %d",
                     self.mode, model.name, n_ctx, self._params["context_size"])
        child = _Child(self._generation, model, n_ctx, free_port())
        self._child = child
        self.board.publish(ServerStatus("starting", record.name, record.path))
        try:
            await self.nursery.start(self._run_child, child, self._command(binary, model, child.port, n_ctx))
        except OSError as exc:
            self._child = None
            message = f"Failed to start llama-server: {exc.strerror or exc}"
            self._fail(record, message)
            raise ServerStartFailed(message) from exc
        metrics.server_starting(self.mode)
        spawned = trio.current_time()
        failure = await self._wait_healthy(child, self._start_timeout(model.info.file_size))
        if failure is not None:
            await self._stop_child()
            self._fail(record, failure)
            raise ServerStartFailed(failure)
        child.running_since = trio.current_time()
        metrics.server_started(self.mode, child.running_since - spawned)
        endpoint = f"http://127.0.0.1:{child.port}"
        self.board.publish(ServerStatus("running", record.name, record.path, None, endpoint, n_ctx,
                                        authorization=f"Bearer {child.key}"))
        log.info("%s: %s running on %s", self.mode, record.name, endpoint)

    async def _wait_healthy(self, child: _Child, timeout: float) -> str | None:
        """Poll /health until 200; return None, or why the child did not become healthy."""
        url = f"http://127.0.0.1:{child.port}/health"
        interval = 0.02
        with trio.move_on_after(timeout):
            while not child.exited.is_set():
                try:
                    response = await self._http.get(url, headers={"Authorization": f"Bearer {child.key}"})
                    if response.status_code == 200:
                        return None
                except httpx.TransportError:
                    pass  # not listening yet
                with trio.move_on_after(interval):
                    await child.exited.wait()
                interval = min(interval * 1.5, 0.5)
            message = f"llama-server exited during startup with code {child.exit_code}"
            reason = child.reason()
            return f"{message}: {reason}" if reason else message
        return f"llama-server did not become ready within {timeout:.0f} s; it was stopped"

    async def _run_child(self, child: _Child, argv: list[str], *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own one llama-server process: spawn, drain its output, reap it, report its exit."""
        read_fd, write_fd = os.pipe()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMA_ARG_", "LLAMA_API_KEY"))}
            env["LLAMA_API_KEY"] = child.key = new_key()  # in the environment: `ps` shows no key
            process = await spawn_owned(argv, env=env, output_fd=write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        child.process = process
        log.info("%s: started llama-server pid %d: %s", self.mode, process.pid, " ".join(argv))
        output = trio.lowlevel.FdStream(read_fd)
        try:
            with child.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._drain, child, output)
                    task_status.started()
                    child.exit_code = await wait_exit(process)
                    # its last lines are why it exited: read them before saying it did
                    with trio.move_on_after(DRAIN_AFTER_EXIT):
                        await child.drained.wait()
                    child.exited.set()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    child.exit_code = await terminate(process, self.settings.stop_grace)
                    child.exited.set()
                await output.aclose()
                child.done.set()
        if not child.stopping:
            await self.self_ref.tell(ServerActor._child_exited, child)

    async def _drain(self, child: _Child, output: trio.lowlevel.FdStream) -> None:
        """Read everything the child prints (so its pipe never fills); log it and keep a tail."""
        log_file = ChildLog(self._log_path, self.mode)
        await log_file.open(f"--- {child.model.record.path} port {child.port}\n".encode())
        pending = b""
        try:
            async with trio.open_nursery() as writing:
                writing.start_soon(log_file.run)
                while chunk := await output.receive_some(65536):
                    await log_file.add(chunk)
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    child.tail.extend(line.decode(errors="replace").rstrip() for line in lines if line.strip())
                    if len(pending) > 65536:
                        pending = pending[-4096:]
                writing.cancel_scope.cancel()
            if pending.strip():  # a last line without its newline
                child.tail.append(pending.decode(errors="replace").rstrip())
            child.drained.set()
        finally:
            await log_file.close()


def _offloaded_layers(params: dict[str, Any]) -> int:
    """`-ngl`: RPC workers count as offload devices, so with workers and `gpu_layers` 0 every
    layer goes to them (split by their free memory); `gpu_layers` N keeps the rest here."""
    return int(params["gpu_layers"]) or (999 if params.get("rpc_servers") else 0)


#: Seconds a llama-server gets to answer a scrape of its figures.
METRICS_TIMEOUT = 2.0
#: Seconds an RPC worker gets to accept a connection before a start fails naming it.
WORKER_CONNECT_TIMEOUT = 2.0


async def _check_workers(workers: list[str]) -> None:
    """Raise `ServerStartFailed` naming the first RPC worker that does not accept a connection.

    llama-server would fail too, but with a message about backends; this one says which
    worker to start (`zenow worker`) or to reach.
    """
    for worker in workers:
        host, _, port = worker.rpartition(":")
        try:
            with trio.fail_after(WORKER_CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
            await stream.aclose()
        except (OSError, trio.TooSlowError) as exc:
            reason = "no answer" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))
            raise ServerStartFailed(
                f"RPC worker {worker} cannot be reached ({reason}): start `zenow worker` there, or check "
                f"the tunnel or network to it, or remove it from rpc_servers"
            ) from None


def _backend_in_use(mode: Mode, url: str) -> BackendInUse:
    return BackendInUse(f"The {mode} mode is served by {url} (backend_url); "
                        'set backend_url to "" to load a local model')


class ServerHandle:
    """What other code holds for one mode's server.

    `store` and `downloads` let `load` find and download a model in the caller's task.
    """

    def __init__(self, mode: Mode, ref: ActorRef[ServerActor], board: ServerBoard, http: httpx.AsyncClient,
                 store: Store, downloads: Downloads) -> None:
        self.mode = mode
        #: Leases on the running model and the switches that wait for them (see `_gate`).
        self.gate = ModelGate(self, DEFAULT_SWITCH_WAIT)
        self._ref = ref
        self._board = board
        self._http = http
        self._store = store
        self._downloads = downloads

    def status(self) -> ServerStatus:
        """The latest published status (a snapshot; it may change right after)."""
        return self._board.status

    def parameters(self) -> dict[str, Any]:
        """The mode's current parameters (a copy)."""
        return dict(self._board.parameters)

    def model_info(self) -> GGUFInfo | None:
        """What the GGUF header of the model this mode runs (or last tried to run) says; None before any."""
        return self._board.model_info

    @property
    def activity(self) -> Activity:
        """What uses this mode's server (the gate counts its leases here)."""
        return self._board.activity

    def asleep(self) -> bool:
        """Whether the mode's model was stopped for idleness, or is being started again after that."""
        status = self._board.status
        return self._board.waking or (status.status == "stopped" and status.reason == IDLE)

    async def wake(self) -> ServerStatus:
        """The status, after starting the mode's model again if it was stopped for idleness, or
        after the start another request began: the actor serves wakes one at a time, so one
        starts the model and the others find it running (or failed) once that start is over;
        a caller that goes away leaves the start going on in the actor.  Raises
        `ModelWakeFailed` (503) when it did not come up again, saying why."""
        if not self.asleep():
            return self._board.status
        self._board.activity.touch()
        try:
            status = await self._ref.call(ServerActor.wake)
        except ServerStartFailed as exc:
            raise ModelWakeFailed(f"The {self.mode} model stopped for idleness did not start again: {exc}") from exc
        return self._woken(status)

    def _woken(self, status: ServerStatus) -> ServerStatus:
        if status.status == "running":
            return status
        why = f": {status.error_message}" if status.error_message else f" (it is {status.status})"
        raise ModelWakeFailed(f"The {self.mode} model {status.model_name!r} did not start again{why}")

    def context_warning(self) -> str | None:
        """What to tell a client when `context_size` is more than the mode's model was trained for."""
        info, status = self._board.model_info, self._board.status
        if info is None or status.model_name is None:
            return None
        return context_warning(status.model_name, int(self._board.parameters["context_size"]),
                               info.context_length, self._board.context_overflow)

    async def load(self, model_name: str, download_url: str | None) -> ServerStatus:
        """Make `model_name` the running model of this mode, downloading it first if needed.

        The download and the check of the file's GGUF header run in the caller's task;
        only then is the actor asked to switch (see `ServerActor.load`), so the mode's
        status, crashes and parameter updates are served during a download.

        Raises `BackendInUse` (a remote backend serves the mode: before any download),
        `ModelNotFound` (unknown name and no URL), `InvalidModelFile` (no file,
        or not a GGUF file llama-server can read: nothing was touched), `InvalidRequest`
        (a bad URL, or the model would not fit in memory), `DownloadFailed`, or
        `ServerStartFailed`.  Cancelling the call stops waiting for a download, not
        the download; once the actor was asked, the switch completes all the same.
        """
        if backend_url := self._board.parameters.get("backend_url"):
            raise _backend_in_use(self.mode, backend_url)
        store, downloads = self._store, self._downloads
        model = await store.find_model(self.mode, model_name)
        if model is None or not model.is_downloaded:
            if not download_url:
                if model is None:
                    raise ModelNotFound(
                        f"Model {model_name!r} not found for mode {self.mode}; "
                        "give a download_url to download it"
                    )
                raise InvalidModelFile(
                    f"Model file not found: {model.path}; give a download_url to download it again"
                )
            await downloads.fetch(download_url, f"{model_name}.gguf", self.mode)
            # the download registered the file under its name without .gguf: this name
            model = await store.find_model(self.mode, model_name)
            if model is None:
                raise ServerStartFailed(f"Model {model_name!r} was downloaded but is not registered")
        info = await trio.to_thread.run_sync(read_gguf_info, Path(model.path))
        if problem := mode_problem(info, self.mode):
            raise InvalidModelFile(f"{model_name} cannot be loaded as {self.mode}: {problem}", param="model_name")
        try:
            return await self._ref.call(ServerActor.load, model, info)
        finally:
            self._board.activity.touch()  # a load resets the idle timer, even of a model already running

    async def update_parameters(self, changes: dict[str, Any]) -> bool:
        """See `ServerActor.update_parameters`; a change resets the idle timer."""
        try:
            return await self._ref.call(ServerActor.update_parameters, changes)
        finally:
            self._board.activity.touch()

    async def server_metrics(self) -> str | None:
        """The running llama-server's own figures (`/metrics`: it starts with `--metrics`), or None
        when nothing runs here (a remote backend's figures are its own) or it did not answer.
        Not a request for the idle timer."""
        status = self._board.status
        endpoint = status.endpoint
        if endpoint is None or status.backend_url is not None:
            return None
        try:
            response = await self._http.get(f"{endpoint}/metrics", timeout=METRICS_TIMEOUT,
                                            headers=status.auth_headers())
            response.raise_for_status()
        except httpx.HTTPError:
            return None
        return response.text

    async def tokenize_count(self, text: str) -> int | None:
        """Count `text` in the running model's tokens (llama-server /tokenize), or None
        when no model is running or it did not answer."""
        status = self._board.status
        if status.endpoint is None or status.token_counting != "tokenize":
            return None
        try:
            response = await self._http.post(f"{status.endpoint}/tokenize", json={"content": text},
                                             headers=status.auth_headers())
            response.raise_for_status()
            return len(response.json()["tokens"])
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            return None

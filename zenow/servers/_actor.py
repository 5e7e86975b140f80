"""The server actor: one per mode, owning that mode's llama-server child.

States (the spec's): not_started → starting → running; a child that exits while
it should run, or never becomes healthy, gives `error` (with the exit code and
the last lines it printed) and is restarted with exponential backoff (1 s doubling
to 30 s; `Settings.restart_backoff` is the first delay) until it fails `MAX_FAST_FAILURES` times without staying up for
`STABLE_AFTER` seconds; then it stays in `error` until the next load.

The actor is the only writer of its state.  Loads, parameter updates and
restarts are messages handled one at a time, so concurrent loads for one mode
are serialized, while the modes never wait for each other.  What routes read
is a published snapshot (`ServerBoard`), so status answers at once even while
a load is in progress.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import httpx
import trio

from ..actor import Actor, ActorRef
from ..errors import InvalidModelFile, ModelNotFound, ServerStartFailed, ZenowError
from ..settings import Settings
from ..store import ModelInfo, Store
from ._binary import find_llama_server
from ._gguf import check_model_file
from ._params import SERVER_KEYS, defaults_for, validate_update
from ._spawn import spawn_owned, terminate, wait_exit

__all__ = ["ServerActor", "ServerBoard", "ServerHandle", "ServerStatus"]

log = logging.getLogger(__name__)

Status = Literal["not_started", "starting", "running", "error", "stopped"]

MAX_FAST_FAILURES = 5
STABLE_AFTER = 60.0
BACKOFF_MAX = 30.0
TAIL_LINES = 40


@dataclass(frozen=True)
class ServerStatus:
    """A snapshot of one mode's server, as the spec shows it (plus where to reach it)."""

    status: Status = "not_started"
    model_name: str | None = None
    model_path: str | None = None
    error_message: str | None = None
    #: http://127.0.0.1:PORT while running; not part of the spec's shape.
    endpoint: str | None = None

    @property
    def is_running(self) -> bool:
        return self.status == "running"

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "model_name": self.model_name,
            "model_path": self.model_path,
            "is_running": self.is_running,
            "error_message": self.error_message,
        }


@dataclass
class ServerBoard:
    """Where a server actor publishes its state for readers; only the actor writes it."""

    status: ServerStatus = field(default_factory=ServerStatus)
    parameters: dict[str, Any] = field(default_factory=dict)

    def publish(self, status: ServerStatus) -> None:
        self.status = status


@dataclass
class _Child:
    generation: int
    model: ModelInfo
    port: int
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    exited: trio.Event = field(default_factory=trio.Event)
    stopping: bool = False
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    running_since: float | None = None

    def last_lines(self, n: int = 8) -> str:
        return "\n".join(list(self.tail)[-n:])


def free_port() -> int:
    """A port on 127.0.0.1 free right now (the child binds it next; a race is handled as a failed start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerActor(Actor):
    def __init__(self, mode: str, settings: Settings, store: Store, board: ServerBoard,
                 downloads: Any = None) -> None:
        self.mode = mode
        self.settings = settings
        self.store = store
        self.board = board
        self.downloads = downloads
        self._child: _Child | None = None
        self._generation = 0
        self._failures: list[float] = []
        self._params: dict[str, Any] = {}
        self._log_path = settings.logs_dir / f"llama-server-{mode}.log"
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False)

    # ------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        stored = await self.store.get_parameters(self.mode)
        defaults = defaults_for(self.mode, self.settings.system_prompt)
        self._params = {**defaults, **{k: v for k, v in stored.items() if k in defaults}}
        self.board.parameters = dict(self._params)
        await self._register_folder()
        current = await self.store.current_model(self.mode)
        if current is None and self.mode == "llm" and self.settings.default_llm is not None:
            current = await self._register_default(self.settings.default_llm)
        if current is not None:
            self.self_ref.cast(ServerActor._boot, current)
        else:
            self.board.publish(ServerStatus())

    async def teardown(self) -> None:
        # The child's own task terminates and reaps it when the nursery is cancelled.
        await self._http.aclose()
        if self.board.status.status in ("starting", "running"):
            self.board.publish(replace(self.board.status, status="stopped", endpoint=None))

    async def _register_folder(self) -> None:
        folder = self.settings.mode_dir(self.mode)
        files = await trio.to_thread.run_sync(
            lambda: sorted((p, p.stat().st_size) for p in folder.glob("*.gguf") if p.is_file())
        )
        for path, size in files:
            await self.store.register_model(self.mode, path.stem, str(path), None, size)

    async def _register_default(self, path: Path) -> ModelInfo | None:
        try:
            size = await trio.to_thread.run_sync(check_model_file, path)
        except ZenowError as exc:
            log.error("--default-llm: %s", exc)
            return None
        model = await self.store.register_model("llm", path.stem, str(path.resolve()), None, size)
        await self.store.set_current_model("llm", model.id)
        log.info("registered %s as the default llm model", path)
        return model

    # ------------------------------------------------------------ operations (messages)

    async def _boot(self, model: ModelInfo) -> None:
        """Start the current model at zenow start; a failure is reported in the status."""
        try:
            await self._switch_to(model)
        except ZenowError as exc:
            log.error("%s: could not start %s: %s", self.mode, model.name, exc)

    async def load(self, model_name: str, download_url: str | None) -> ServerStatus:
        """Make `model_name` the running model of this mode, downloading it first if needed.

        Raises `ModelNotFound` (unknown name and no URL), `InvalidModelFile`,
        `DownloadFailed`, or `ServerStartFailed`; then the mode reports why in its status.
        """
        model = await self.store.find_model(self.mode, model_name)
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
            if self.downloads is None:
                raise ServerStartFailed("Downloads are not available")
            filename = f"{model_name}.gguf"
            await self.downloads.fetch(download_url, filename, self.mode)
            model = await self.store.register_model(
                self.mode, model_name, str(self.settings.mode_dir(self.mode) / filename), download_url
            )
        current = self.board.status
        if current.status == "running" and current.model_path == model.path:
            await self.store.set_current_model(self.mode, model.id)
            return current  # already serving this model: nothing to restart
        await self._switch_to(model)
        return self.board.status

    async def update_parameters(self, changes: dict[str, Any]) -> bool:
        """Apply a partial update; restart a live server if a server parameter changed.

        Returns whether a server parameter changed (`requires_restart`).  Raises
        `InvalidRequest` naming the bad keys; then nothing changed.
        """
        merged = validate_update(self.mode, self._params, changes)
        changed = {k for k in merged if merged[k] != self._params.get(k)}
        await self.store.set_parameters(self.mode, {k: merged[k] for k in changes})
        self._params = merged
        self.board.parameters = dict(merged)
        requires_restart = bool(changed & SERVER_KEYS)
        child = self._child
        if requires_restart and child is not None and self.board.status.status in ("starting", "running", "error"):
            try:
                await self._switch_to(child.model)
            except ZenowError as exc:
                log.error("%s: restart after a parameter change failed: %s", self.mode, exc)
        return requires_restart

    async def _child_exited(self, child: _Child) -> None:
        if child is not self._child or child.stopping:
            return  # an old child, or one we stopped on purpose
        message = f"llama-server exited unexpectedly with code {child.exit_code}"
        if child.tail:
            message += f": {child.last_lines()}"
        log.error("%s: %s", self.mode, message)
        self._child = None
        self.board.publish(ServerStatus("error", child.model.name, child.model.path, message))
        self._schedule_retry(child.model, child.running_since)

    async def _retry(self, generation: int, model: ModelInfo) -> None:
        if generation != self._generation:
            return  # a load or parameter change happened meanwhile
        try:
            await self._start(model)
        except ServerStartFailed:
            self._schedule_retry(model, None)
        except InvalidModelFile as exc:  # the file went away: retrying cannot help
            self.board.publish(ServerStatus("error", model.name, model.path, str(exc)))

    # ------------------------------------------------------------ internals

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
        generation = self._generation
        log.info("%s: restarting in %.1f s", self.mode, delay)

        async def later() -> None:
            await trio.sleep(delay)
            await self.self_ref.tell(ServerActor._retry, generation, model)

        self.nursery.start_soon(later)

    async def _switch_to(self, model: ModelInfo) -> None:
        """Stop whatever runs, start `model`; on success make it the current model."""
        await trio.to_thread.run_sync(check_model_file, Path(model.path))
        self._failures.clear()
        await self._start(model)
        await self.store.set_current_model(self.mode, model.id)

    async def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.stopping = True
            child.cancel_scope.cancel()
            await child.done.wait()

    def _command(self, binary: str, model: ModelInfo, port: int) -> list[str]:
        p = self._params
        argv = [
            binary, "-m", model.path, "--host", "127.0.0.1", "--port", str(port),
            "-c", str(p["context_size"]), "-t", str(p["threads"]), "-ngl", str(p["gpu_layers"]),
            "-b", str(p["batch_size"]), "--no-webui",
        ]
        if self.mode == "llm":
            argv += ["-np", "1"]  # one slot owning the whole context window
        elif self.mode == "embed":
            argv += ["--embedding", "-ub", str(p["batch_size"])]
        else:
            argv += ["--reranking", "-ub", str(p["batch_size"])]
        return argv

    def _start_timeout(self, size: int | None) -> float:
        gib = (size or 0) / 2**30
        return self.settings.start_timeout_base + self.settings.start_timeout_per_gib * gib

    async def _start(self, model: ModelInfo) -> None:
        """Start a child for `model` and wait until it is healthy.  Raises `ServerStartFailed`."""
        await self._stop_child()
        self._generation += 1
        try:
            binary = find_llama_server(self.settings)
        except ServerStartFailed as exc:
            self.board.publish(ServerStatus("error", model.name, model.path, str(exc)))
            raise
        child = _Child(self._generation, model, free_port())
        self._child = child
        self.board.publish(ServerStatus("starting", model.name, model.path))
        try:
            await self.nursery.start(self._run_child, child, self._command(binary, model, child.port))
        except OSError as exc:
            self._child = None
            message = f"Failed to start llama-server: {exc.strerror or exc}"
            self.board.publish(ServerStatus("error", model.name, model.path, message))
            raise ServerStartFailed(message) from exc
        try:
            size = await trio.to_thread.run_sync(check_model_file, Path(model.path))
        except InvalidModelFile as exc:
            await self._stop_child()
            self.board.publish(ServerStatus("error", model.name, model.path, str(exc)))
            raise
        failure = await self._wait_healthy(child, self._start_timeout(size))
        if failure is not None:
            await self._stop_child()
            self.board.publish(ServerStatus("error", model.name, model.path, failure))
            raise ServerStartFailed(failure)
        child.running_since = trio.current_time()
        endpoint = f"http://127.0.0.1:{child.port}"
        self.board.publish(ServerStatus("running", model.name, model.path, None, endpoint))
        log.info("%s: %s running on %s", self.mode, model.name, endpoint)

    async def _wait_healthy(self, child: _Child, timeout: float) -> str | None:
        """Poll /health until 200; return None, or why the child did not become healthy."""
        url = f"http://127.0.0.1:{child.port}/health"
        interval = 0.02
        with trio.move_on_after(timeout):
            while not child.exited.is_set():
                try:
                    response = await self._http.get(url)
                    if response.status_code == 200:
                        return None
                except httpx.TransportError:
                    pass  # not listening yet
                with trio.move_on_after(interval):
                    await child.exited.wait()
                interval = min(interval * 1.5, 0.5)
            message = f"llama-server exited during startup with code {child.exit_code}"
            return message + (f": {child.last_lines()}" if child.tail else "")
        return f"llama-server did not become ready within {timeout:.0f} s; it was stopped"

    async def _run_child(self, child: _Child, argv: list[str], *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own one llama-server process: spawn, drain its output, reap it, report its exit."""
        read_fd, write_fd = os.pipe()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}
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
        """Read everything the child prints (so its pipe never fills); log it and keep a tail.

        A log file that cannot be written is given up, never the draining."""
        log_file = await self._open_log(f"--- {child.model.path} port {child.port}\n".encode())
        pending = b""
        try:
            while chunk := await output.receive_some(65536):
                if log_file is not None:
                    try:
                        await log_file.write(chunk)
                    except OSError as exc:
                        log.warning("%s: stopped writing %s: %s", self.mode, self._log_path, exc)
                        await _close_quietly(log_file)
                        log_file = None
                pending += chunk
                *lines, pending = pending.split(b"\n")
                child.tail.extend(line.decode(errors="replace").rstrip() for line in lines if line.strip())
                if len(pending) > 65536:
                    pending = pending[-4096:]
        finally:
            if log_file is not None:
                with trio.CancelScope(shield=True):
                    await _close_quietly(log_file)

    async def _open_log(self, header: bytes) -> Any:
        try:
            log_file = await trio.open_file(self._log_path, "ab")
            await log_file.write(header)
            return log_file
        except OSError as exc:
            log.warning("%s: cannot write %s: %s", self.mode, self._log_path, exc)
            return None


async def _close_quietly(log_file: Any) -> None:
    try:
        await log_file.aclose()
    except OSError:
        pass


class ServerHandle:
    """What other code holds for one mode's server."""

    def __init__(self, mode: str, ref: ActorRef[ServerActor], board: ServerBoard,
                 http: httpx.AsyncClient) -> None:
        self.mode = mode
        self._ref = ref
        self._board = board
        self._http = http

    def status(self) -> ServerStatus:
        """The latest published status (a snapshot; it may change right after)."""
        return self._board.status

    def parameters(self) -> dict[str, Any]:
        """The mode's current parameters (a copy)."""
        return dict(self._board.parameters)

    async def load(self, model_name: str, download_url: str | None) -> ServerStatus:
        return await self._ref.call(ServerActor.load, model_name, download_url)

    async def update_parameters(self, changes: dict[str, Any]) -> bool:
        return await self._ref.call(ServerActor.update_parameters, changes)

    async def tokenize_count(self, text: str) -> int | None:
        """Count `text` in the running model's tokens (llama-server /tokenize), or None
        when no model is running or it did not answer."""
        endpoint = self._board.status.endpoint
        if endpoint is None:
            return None
        try:
            response = await self._http.post(f"{endpoint}/tokenize", json={"content": text})
            response.raise_for_status()
            return len(response.json()["tokens"])
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            return None

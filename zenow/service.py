"""The whole service: the home lock, the listening socket, the supervised actors, hypercorn."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from functools import partial
from pathlib import Path

import httpx
import trio
from hypercorn.config import Config
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from .actor import ActorHealth, Supervisor
from .app import create_app, is_loopback
from .chat import ChatStreamer, ChatStreamerActor
from .downloads import DownloadActor, Downloads
from .errors import ServerStartFailed, ZenowError
from .events import EventHub, current_state
from .handles import Services
from .http_server import serve_http
from .servers import ServerActor, ServerBoard, ServerHandle, find_llama_server, upstream_client
from .settings import MODES, Mode, Settings
from .store import Store, StoreActor
from .tokens import TokenCounter
from .v1 import OpenAIGateway, UpstreamActor

__all__ = ["Exposed", "HomeInUse", "PortInUse", "check_exposure", "serve"]

log = logging.getLogger(__name__)


class HomeInUse(ZenowError):
    """Another zenow holds the home's lock."""


class PortInUse(ZenowError):
    """The address to listen on is taken."""


class Exposed(ZenowError):
    """Listening beyond loopback without an API key (and without --insecure)."""


def check_exposure(settings: Settings) -> None:
    """Refuse to serve other machines with no key: they would get every conversation and model.

    Raises `Exposed` saying how to proceed.
    """
    if not is_loopback(settings.host) and not settings.api_keys and not settings.insecure:
        raise Exposed(
            f"refusing to listen on {settings.host} without an API key: anyone who can reach it could "
            "read every conversation. Give --api-key-file (or ZENOW_API_KEY), or --insecure if you mean it"
        )


class HomeLock:
    """An exclusive lock on the home, held while the file stays open.

    The kernel releases it when the process dies, however it dies.
    """

    def __init__(self, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.path = home / "zenow.lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HomeInUse(f"another zenow is already running with home {home}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; raises `PortInUse` naming the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(f"port {port} on {host} is already in use") from None
        raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.graceful_timeout = settings.graceful_timeout
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # Connections idle between requests, or slow to send a request's headers, are dropped
    # after this; a slow body is cut by the app's BODY_TIMEOUT.  (hypercorn's read_timeout
    # is not used: it would also cut a long SSE answer, during which the client sends nothing.)
    config.keep_alive_timeout = settings.keep_alive_timeout
    config.h11_max_incomplete_size = 64 * 1024  # request line and headers
    return config


async def serve(
    settings: Settings,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run zenow until `shutdown` is set (or the call is cancelled).

    Started means serving: `task_status` gets the (host, port) actually bound.
    On shutdown, open requests get `settings.graceful_timeout` seconds, then every
    actor stops, every llama-server child is terminated and reaped, and the
    database is closed.  Raises `HomeInUse`, `PortInUse` or `StoreError` when it
    cannot start.
    """
    shutdown = shutdown if shutdown is not None else trio.Event()
    check_exposure(settings)
    lock = HomeLock(settings.home)
    try:
        for mode in MODES:
            settings.mode_dir(mode).mkdir(parents=True, exist_ok=True)
        settings.logs_dir.mkdir(parents=True, exist_ok=True)
        with bind_listener(settings.host, settings.port) as listener:
            async with upstream_client(httpx.Timeout(10.0)) as upstream:
                await _run(settings, upstream, listener, shutdown, task_status)
    finally:
        lock.release()


async def _run(
    settings: Settings, upstream: httpx.AsyncClient, listener: socket.socket, shutdown: trio.Event,
    task_status: trio.TaskStatus[tuple[str, int]],
) -> None:
    """Start the actors in tiers, serve HTTP, then stop the tiers in reverse order.

    The store outlives the servers and downloads, which outlive the chat streamer, so
    whatever a stopping actor saves (a partial reply, a download's progress) still
    reaches the database.
    """
    health = ActorHealth()
    events = EventHub()
    async with trio.open_nursery() as store_tier:
        store_tier.start_soon(events.release_held_progress)
        store = Store(
            await Supervisor(store_tier, health=health).start(
                "store",
                partial(StoreActor, settings.database_path, int(settings.db_busy_timeout * 1000)),
                critical=True,
            ),
            events,
        )
        try:
            log.info("llama-server: %s", find_llama_server(settings))
        except ServerStartFailed as exc:
            log.warning("%s", exc)  # zenow still serves sessions; loads will say the same
        async with trio.open_nursery() as model_tier:
            supervisor = Supervisor(model_tier, health=health)
            downloads = Downloads(await supervisor.start("download actor", partial(DownloadActor, settings, store)))
            servers: dict[Mode, ServerHandle] = {}
            for mode in MODES:
                board = ServerBoard()
                ref = await supervisor.start(
                    f"{mode} server", partial(ServerActor, mode, settings, store, board)
                )
                servers[mode] = ServerHandle(mode, ref, board, upstream, store, downloads)
            tokens = TokenCounter(servers["llm"].tokenize_count)
            events.set_snapshot_provider(partial(current_state, servers, downloads))
            openai = OpenAIGateway(await supervisor.start(
                "v1 upstream actor", partial(UpstreamActor, batch_window=settings.stream_batch_window)
            ), store, servers, read_ahead=settings.prefill_next_turn)
            async with trio.open_nursery() as chat_tier:
                chat = ChatStreamer(
                    await Supervisor(chat_tier, health=health).start(
                        "chat streamer", partial(ChatStreamerActor, store, servers["llm"],
                                                  batch_window=settings.stream_batch_window,
                                                  prefill_next_turn=settings.prefill_next_turn)
                    ),
                    max_streams=settings.max_chat_streams,
                )
                services = Services(settings=settings, store=store, tokens=tokens, downloads=downloads,
                                    servers=servers, chat=chat, openai=openai, health=health, events=events)
                chat_tier.start_soon(_end_event_streams, shutdown, events)
                await _serve_http(create_app(services), settings, listener, shutdown, task_status)
                log.info("zenow stopping")
                chat_tier.cancel_scope.cancel()
            model_tier.cancel_scope.cancel()
        store_tier.cancel_scope.cancel()


async def _end_event_streams(shutdown: trio.Event, events: EventHub) -> None:
    """At shutdown, end the event streams at once: they would hold the graceful timeout."""
    await shutdown.wait()
    events.close()


async def _serve_http(
    app: QuartTrio, settings: Settings, listener: socket.socket, shutdown: trio.Event,
    task_status: trio.TaskStatus[tuple[str, int]],
) -> None:
    """Serve `app` on `listener` until `shutdown`; open requests then get the graceful timeout."""
    host, port = listener.getsockname()[:2]
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(
                serve_http,
                wrap_app(app, settings.max_body_size, "asgi"),
                _hypercorn_config(settings),
                listener,
                max_connections=settings.max_connections,
                shutdown=shutdown,
            )
        )
        log.info("zenow serving on http://%s:%d (home %s)", host, port, settings.home)
        task_status.started((host, port))

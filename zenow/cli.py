"""The `zenow` command line: `serve`, `convert`, `backup`, and the terminal client's commands
(`pull`, `run`/`chat`, `status`, `models`, `load`, `sessions`; see `zenow.client`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from . import __version__
from .client import CLIENT_COMMANDS, add_client_commands, run_client_command
from .errors import ZenowError, single_cause
from .settings import Settings, stream_batch_window

__all__ = ["main"]

log = logging.getLogger("zenow")


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _size(text: str) -> int:
    """A byte count like `8M` or `64G` (binary units) or a plain number."""
    number, unit = text.strip().upper().rstrip("IB") or "0", ""
    if number and number[-1] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = int(float(number) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 8M or 64G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _batch_window(text: str) -> float:
    try:
        return stream_batch_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _api_keys(given: list[str] | None, key_file: Path | None) -> tuple[str, ...] | None:
    """The keys from `--api-key` and `--api-key-file`, or None when neither was given."""
    keys = [k.strip() for k in given or () if k.strip()]
    if key_file is not None:
        try:
            lines = key_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SystemExit(f"zenow: cannot read --api-key-file {key_file}: {exc.strerror}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise SystemExit(f"zenow: --api-key-file {key_file} holds no key")
    return tuple(keys) or None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zenow",
        description="Zenow: a local LLM backend. One HTTP API (port 8050) over local GGUF "
        "models served by llama.cpp's llama-server, for chat (llm), embed and rerank.",
    )
    parser.add_argument("--version", action="version", version=f"zenow {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    serve = commands.add_parser(
        "serve",
        help="run the HTTP service",
        description="Run the zenow HTTP service until SIGINT or SIGTERM. Options override the "
        "ZENOW_* environment variables, which override the defaults.",
    )
    serve.add_argument("--host", default=None, help="address to listen on (env ZENOW_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port to listen on (env ZENOW_PORT; default 8050)")
    serve.add_argument(
        "--home", type=Path, default=None,
        help="directory zenow owns: the database zenow.db, models/{llm,embed,rerank}/, logs/ "
        "(env ZENOW_HOME; default ~/.cache/zenow)",
    )
    serve.add_argument(
        "--default-llm", type=Path, default=None, metavar="GGUF",
        help="a GGUF file to register and load as the llm model when the home has no current "
        "llm model (env ZENOW_DEFAULT_LLM)",
    )
    serve.add_argument(
        "--llama-server", default=None, metavar="PATH",
        help="the llama-server binary (env ZENOW_LLAMA_SERVER; default: llama-server on PATH, "
        "then the one ops/provide-llama-server.sh built)",
    )
    serve.add_argument(
        "--cors-origin", action="append", default=None, metavar="ORIGIN",
        help="also allow this browser origin, exactly (repeatable; env ZENOW_CORS_ORIGINS, "
        "comma-separated). Local origins are always allowed; 'null' (file:// pages, but also "
        "any sandboxed iframe) only when given here.",
    )
    serve.add_argument(
        "--api-key", action="append", default=None, metavar="KEY",
        help="require this key on every request but GET /api/health, as 'Authorization: Bearer KEY' "
        "or 'x-api-key: KEY' (repeatable; env ZENOW_API_KEY). Prefer --api-key-file or the "
        "environment: a command line is visible to every user of the machine.",
    )
    serve.add_argument(
        "--api-key-file", type=Path, default=None, metavar="FILE",
        help="read API keys from FILE, one per line (blank lines and # comments ignored)",
    )
    serve.add_argument(
        "--insecure", action="store_true", default=None,
        help="allow listening on a non-loopback address without an API key",
    )
    serve.add_argument(
        "--allowed-host", action="append", default=None, metavar="NAME",
        help="also answer requests whose Host header is NAME (repeatable; env ZENOW_ALLOWED_HOSTS, "
        "comma-separated). Bound to loopback, zenow answers only localhost, 127.0.0.1 and [::1] "
        "otherwise, against DNS rebinding.",
    )
    serve.add_argument(
        "--max-body-size", type=_size, default=None, metavar="BYTES",
        help="largest request body accepted, e.g. 8M (default 8 MiB); larger ones answer 413",
    )
    serve.add_argument(
        "--max-download-size", type=_size, default=None, metavar="BYTES",
        help="largest model file a download may write, e.g. 64G (default 64 GiB)",
    )
    serve.add_argument(
        "--max-chat-streams", type=int, default=None, metavar="N",
        help="chats answered at once (default 64); more answer 503 until one ends",
    )
    serve.add_argument(
        "--max-connections", type=int, default=None, metavar="N",
        help="HTTP connections served at once (default 256); more wait to be accepted",
    )
    serve.add_argument(
        "--stream-batch-ms", type=_batch_window, default=None, metavar="MS", dest="stream_batch_window",
        help="while a model streams faster than two tokens in MS milliseconds, pass its tokens on in "
        "groups about MS apart (one read and one write each), which leaves the model more CPU (default 50, "
        "at most 200; 0: each token as it comes; env ZENOW_STREAM_BATCH_MS)",
    )
    serve.add_argument(
        "--prefill-next-turn", choices=("on", "off"), default=None,
        help="after a chat's reply, have llama-server read the start of the session's next turn into its "
        "cache, so that the next turn's first token comes sooner on a long conversation (default on; env "
        "ZENOW_PREFILL_NEXT_TURN)",
    )
    serve.add_argument(
        "--system-prompt", default=None,
        help="default system prompt for chat (env ZENOW_SYSTEM_PROMPT)",
    )
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    commands.add_parser(
        "convert", add_help=False,
        help="convert a BERT embedding model (safetensors) to GGUF; 'zenow convert --help' for more",
    )
    worker = commands.add_parser(
        "worker",
        help="lend this machine to another zenow's model (llama.cpp rpc-server, in the foreground)",
        description="Run llama.cpp's rpc-server in the foreground, so that a zenow elsewhere can split a "
        "model across this machine: there, set the mode's parameter rpc_servers to [\"HOST:PORT\"]. "
        "rpc-server has NO authentication and no encryption: it listens on 127.0.0.1 unless --insecure; "
        "reach it through an SSH tunnel (ssh -N -L 50052:127.0.0.1:50052 THIS-HOST on the zenow machine) "
        "or bind it to a private network you trust.",
    )
    worker.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    worker.add_argument("--port", type=int, default=50052, help="port to listen on (default 50052)")
    worker.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: rpc-server's)")
    worker.add_argument("--insecure", action="store_true",
                        help="allow a non-loopback --host: anyone who reaches the port can use this machine")
    backup = commands.add_parser(
        "backup",
        help="copy the database consistently, even while zenow runs",
        description="Copy HOME/zenow.db to OUT with SQLite's online backup API: consistent while "
        "zenow serves, checked, and renamed into place only when complete. To restore, stop zenow "
        "and put the copy at HOME/zenow.db (or start zenow with --home on a folder holding it).",
    )
    backup.add_argument("out", type=Path, metavar="OUT.db", help="where to write the copy")
    backup.add_argument("--home", type=Path, default=None, help="zenow's home (env ZENOW_HOME; default ~/.cache/zenow)")
    add_client_commands(commands)
    return parser


def _worker(args: argparse.Namespace) -> int:
    from .worker import run_worker, worker_command

    try:
        argv = worker_command(Settings.from_environment(), args.host, args.port, args.threads, args.insecure)
        print(f"zenow worker: {' '.join(argv)}", file=sys.stderr, flush=True)
        run_worker(argv)
    except ZenowError as exc:
        print(f"zenow: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"zenow: cannot run rpc-server: {exc.strerror or exc}", file=sys.stderr)
    return 1


def _backup(args: argparse.Namespace) -> int:
    from .store import backup_database

    settings = Settings.from_environment(home=args.home)
    try:
        sessions = backup_database(settings.database_path, args.out)
    except (OSError, sqlite3.Error) as exc:
        print(f"zenow: backup failed: {exc}", file=sys.stderr)
        return 1
    print(f"backed up {settings.database_path} to {args.out} ({sessions} sessions)")
    return 0


async def _serve_until_signalled(settings: Settings) -> None:
    from .service import serve

    shutdown = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, signals, shutdown, nursery.cancel_scope)
            await serve(settings, shutdown=shutdown)
            nursery.cancel_scope.cancel()


async def _watch_signals(signals: object, shutdown: trio.Event, scope: trio.CancelScope) -> None:
    async for signum in signals:  # type: ignore[attr-defined]
        if not shutdown.is_set():
            log.info("received %s: shutting down", signal.Signals(signum).name)
            shutdown.set()
        else:
            log.warning("second signal: stopping now")
            scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:  # its own parser: options like --into come before the paths
        from .convert import main as convert_main

        return convert_main(argv[1:], prog="zenow convert")
    args = _parser().parse_args(argv)
    if args.command == "backup":
        return _backup(args)
    if args.command == "worker":
        return _worker(args)
    if args.command in CLIENT_COMMANDS:
        return run_client_command(args)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll is noise
    try:
        settings = _serve_settings(args)
    except ValueError as exc:  # a malformed environment variable
        print(f"zenow: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_serve_until_signalled, settings)
    except BaseException as exc:  # one line for known failures, a traceback otherwise
        cause = single_cause(exc)
        if isinstance(cause, ZenowError):
            print(f"zenow: {cause}", file=sys.stderr)
            return 1
        if isinstance(cause, KeyboardInterrupt):
            return 0
        raise
    return 0


def _serve_settings(args: argparse.Namespace) -> Settings:
    return Settings.from_environment(
        host=args.host, port=args.port, home=args.home, default_llm=args.default_llm,
        llama_server=args.llama_server,
        cors_origins=tuple(args.cors_origin) if args.cors_origin else None,
        allowed_hosts=tuple(args.allowed_host) if args.allowed_host else None,
        api_keys=_api_keys(args.api_key, args.api_key_file), insecure=args.insecure,
        max_body_size=args.max_body_size, max_download_size=args.max_download_size,
        max_connections=args.max_connections, max_chat_streams=args.max_chat_streams,
        system_prompt=args.system_prompt, stream_batch_window=args.stream_batch_window,
        prefill_next_turn=None if args.prefill_next_turn is None else args.prefill_next_turn == "on",
    )

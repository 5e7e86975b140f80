"""The client's subcommands of `zenow`: their options, and running one.

Only argparse is imported here, so `zenow serve` does not load the client (rich, httpx
streaming) at all; a command's module is imported when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..settings import MODES

if TYPE_CHECKING:
    from ._api import ZenowAPI
    from ._output import Output

__all__ = ["CLIENT_COMMANDS", "add_client_commands", "run_client_command"]

CLIENT_COMMANDS = frozenset({"pull", "run", "chat", "status", "models", "load", "sessions"})


def _connection_options(env: Mapping[str, str]) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=env.get("ZENOW_URL") or "http://127.0.0.1:8050",
        help="the zenow to talk to (env ZENOW_URL; default http://127.0.0.1:8050). An API key, when zenow "
        "wants one, comes from env ZENOW_API_KEY",
    )
    common.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    return common


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                        env: Mapping[str, str] | None = None) -> None:
    """Add `pull`, `run` (alias `chat`), `status`, `models`, `load` and `sessions` to `commands`."""
    common = _connection_options(os.environ if env is None else env)
    mode_help = "the model's mode: llm, embed or rerank (default llm)"

    pull = commands.add_parser(
        "pull", parents=[common], help="download a model through a running zenow, with a progress bar",
        description="Download a GGUF model through zenow into models/MODE/, showing progress (percent, size, "
        "speed, ETA) from its live events. Ctrl-C cancels the download and keeps what arrived; the same "
        "pull again resumes it.",
    )
    pull.add_argument("url_to_pull", metavar="URL", help="where to download the GGUF file from")
    pull.add_argument("--mode", choices=MODES, default="llm", help=mode_help)
    pull.add_argument("--name", default=None, help="the model's name (default: the URL's file name without .gguf)")
    pull.add_argument("--sha256", default=None, metavar="HEX", help="the SHA-256 the file must have")

    for name, aliases in (("run", ["chat"]),):
        run = commands.add_parser(
            name, aliases=aliases, parents=[common], help="chat with the llm model in a saved session",
            description="Chat in a saved session, replies streaming as they are generated. With a terminal: "
            "/new, /sessions, /exit. Otherwise stdin is one question, answered once (echo question | zenow run).",
        )
        run.add_argument("model", nargs="?", default=None, metavar="MODEL",
                         help="load this llm model first (a registered name)")
        run.add_argument("--session", type=int, default=None, metavar="ID", help="continue this session")
        run.add_argument("--temperature", type=float, default=None, help="sampling temperature (0 to 2)")
        run.add_argument("--max-tokens", type=int, default=None, metavar="N", help="longest reply, in tokens")

    commands.add_parser("status", parents=[common], help="what runs in each mode",
                        description="Each mode's llama-server: status, model, error.")
    models = commands.add_parser("models", parents=[common], help="the registered models",
                                 description="The registered models: mode, size, downloaded, running.")
    models.add_argument("--mode", choices=MODES, default=None, help="only this mode's models")
    load = commands.add_parser("load", parents=[common], help="load a registered model",
                               description="Make NAME the running model of its mode; waits until it serves.")
    load.add_argument("name", metavar="NAME", help="a registered model's name")
    load.add_argument("--mode", choices=MODES, default="llm", help=mode_help)
    sessions = commands.add_parser("sessions", parents=[common], help="the saved chat sessions",
                                   description="The saved sessions, most recently updated first.")
    sessions.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")


def run_client_command(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Run the client command `args` names; return the exit code.

    Failures are one line on stderr (`zenow: ...`) and exit code 1; Ctrl-C is 130.
    """
    from ._api import ClientError, ZenowAPI
    from ._output import Output

    environ = os.environ if env is None else env
    out = Output(as_json=args.json)
    try:
        with ZenowAPI(args.url, environ.get("ZENOW_API_KEY") or None) as api:
            return _dispatch(api, out, args)
    except ClientError as exc:
        print(f"zenow: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(api: ZenowAPI, out: Output, args: argparse.Namespace) -> int:
    from . import _chat, _commands, _pull

    command = args.command
    if command == "pull":
        return _pull.pull(api, out, args.url_to_pull, args.mode, args.name, args.sha256)
    if command in ("run", "chat"):
        options = {key: value for key, value in
                   (("temperature", args.temperature), ("max_tokens", args.max_tokens)) if value is not None}
        return _chat.run(api, out, args.model, args.session, options)
    if command == "status":
        return _commands.status(api, out)
    if command == "models":
        return _commands.models(api, out, args.mode)
    if command == "load":
        return _commands.load(api, out, args.name, args.mode)
    if command == "sessions":
        return _commands.sessions(api, out, args.limit)
    raise AssertionError(f"not a client command: {command}")

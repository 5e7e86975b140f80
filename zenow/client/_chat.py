"""`zenow run [MODEL]` (alias `chat`): chat with the llm model in a saved session.

With a terminal on stdin it is a conversation: each reply streams as it is generated;
`/new` starts a new session, `/sessions` lists them, `/exit` (or Ctrl-D) quits, Ctrl-C
stops a reply midway.  Otherwise the whole of stdin is one question, answered once
(`echo question | zenow run`): the reply goes to stdout, the session id to stderr.
"""

from __future__ import annotations

import sys
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TextIO

from ._api import ClientError, ZenowAPI
from ._commands import load_model, sessions
from ._output import Output

__all__ = ["run"]

#: Seconds to wait for an llm model that is still starting, and between two looks.
START_WAIT = 600.0
START_POLL = 0.5

HELP = "/new starts a new session, /sessions lists them, /exit quits (Ctrl-C stops a reply)"
PROMPT = ">>> "


class _Chat:
    def __init__(self, api: ZenowAPI, out: Output, session_id: int | None, options: dict[str, Any]) -> None:
        self.api = api
        self.out = out
        self.session_id = session_id
        self.options = options

    def session_for(self, first_message: str) -> tuple[int, bool]:
        """The session to save this turn in, and whether it was just created (named after the message)."""
        if self.session_id is None:
            created = self.api.post("/api/sessions", {"first_message": first_message})
            self.session_id = int(created["session_id"])
            return self.session_id, True
        return self.session_id, False

    def reply(self, session_id: int, text: str, sink: TextIO | None) -> str:
        """Ask `text` in the session; write each piece of the reply to `sink` as it comes; return the reply."""
        body = {"session_id": session_id, "messages": [{"role": "user", "content": text}], **self.options}
        pieces: list[str] = []
        with self.api.chat(body) as deltas:
            for piece in deltas:
                pieces.append(piece)
                if sink is not None:
                    sink.write(piece)
                    sink.flush()
        return "".join(pieces)


def run(api: ZenowAPI, out: Output, model: str | None, session_id: int | None, options: dict[str, Any],
        stdin: TextIO | None = None) -> int:
    """Chat (see the module docstring); returns the exit code.  Raises `ClientError`."""
    stdin = stdin or sys.stdin
    if model is not None:
        loaded = load_model(api, out, model, "llm")
        out.note(f"{loaded.get('model_name') or model} is running")
    name = None
    if session_id is not None:
        name = api.get(f"/api/sessions/{session_id}")["session_name"]
    chat = _Chat(api, out, session_id, options)
    if not stdin.isatty():
        _wait_for_llm(api, out)  # before a session is made for a question nobody can answer
        return _answer_once(chat, stdin.read())
    try:
        _wait_for_llm(api, out)
    except ClientError as exc:
        out.line(f"zenow: {exc}", style="red")  # a conversation may still start once a model is loaded
    return _converse(chat, name)


def _wait_for_llm(api: ZenowAPI, out: Output) -> None:
    """Return once the llm server runs (waiting while it starts); raise `ClientError` saying why it does not."""
    server = api.get("/api/server/status", {"mode": "llm"})
    if server["status"] == "starting":
        waiting: AbstractContextManager[Any] = (
            out.console.status("the llm model is starting…") if out.is_terminal else nullcontext()
        )
        deadline = time.monotonic() + START_WAIT
        with waiting:
            while server["status"] == "starting" and time.monotonic() < deadline:
                time.sleep(START_POLL)
                server = api.get("/api/server/status", {"mode": "llm"})
    if server["status"] == "running":
        return
    why = f": {server['error_message']}" if server.get("error_message") else ""
    raise ClientError(f"no llm model is running (status {server['status']}{why}); "
                      "`zenow run MODEL` or `zenow load MODEL` loads one")


def _answer_once(chat: _Chat, question: str) -> int:
    question = question.strip()
    if not question:
        raise ClientError("nothing to ask: stdin was empty")
    out = chat.out
    session_id, _ = chat.session_for(question)
    out.note(f"session {session_id}")
    answer = chat.reply(session_id, question, None if out.as_json else out.stdout)
    if out.as_json:
        out.json({"session_id": session_id, "answer": answer})
    else:
        out.stdout.write("\n")
        out.stdout.flush()
    return 0


def _converse(chat: _Chat, name: str | None) -> int:
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    out = chat.out
    out.line(f"zenow chat at {chat.api.url}: {HELP}", style="dim")
    if chat.session_id is not None:
        out.line(f"session {chat.session_id}: {name}", style="dim")
    while True:
        try:
            text = input(PROMPT).strip()
        except EOFError:
            out.stdout.write("\n")
            return 0
        except KeyboardInterrupt:
            out.stdout.write("\n")
            return 130
        if not text:
            continue
        if text.startswith("/"):
            if _command(chat, text.split()[0]):
                return 0
            continue
        try:
            session_id, created = chat.session_for(text)
            if created:
                out.line(f"session {session_id}", style="dim")
            chat.reply(session_id, text, out.stdout)
            out.stdout.write("\n")
        except KeyboardInterrupt:
            out.line("\n[stopped]", style="dim")
        except ClientError as exc:
            out.line(f"zenow: {exc}", style="red")


def _command(chat: _Chat, command: str) -> bool:
    """Run a `/command`; True when the conversation should end."""
    out = chat.out
    if command in ("/exit", "/quit", "/bye"):
        return True
    if command == "/new":
        chat.session_id = None
        out.line("a new session starts with your next message", style="dim")
    elif command == "/sessions":
        try:
            sessions(chat.api, out, limit=20)
        except ClientError as exc:
            out.line(f"zenow: {exc}", style="red")
    else:
        out.line(f"{command}? {HELP}", style="dim")
    return False

"""The table commands: `status`, `models`, `sessions`, and `load`."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from ..settings import MODES
from ._api import ClientError, ZenowAPI
from ._output import Output, human_size

__all__ = ["load", "load_model", "models", "sessions", "status", "statuses"]

#: A load waits for llama-server to become healthy: allow it as long as zenow does for a big model.
LOAD_TIMEOUT = 30 * 60.0


def statuses(api: ZenowAPI) -> dict[str, dict[str, Any]]:
    """Every mode's server status, as `GET /api/server/status` answers it."""
    return {mode: api.get("/api/server/status", {"mode": mode}) for mode in MODES}


def status(api: ZenowAPI, out: Output) -> int:
    """What runs in each mode."""
    servers = statuses(api)
    if out.as_json:
        out.json(servers)
        return 0
    rows = [[mode, s["status"], s.get("model_name") or "-", _one_line(s.get("error_message")) or "-"]
            for mode, s in servers.items()]
    out.table(f"zenow at {api.url}", ["mode", "status", "model", "error"], rows)
    return 0


def _one_line(text: str | None, limit: int = 120) -> str | None:
    if not text:
        return None
    first = " ".join(text.split())
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _size_of(model: dict[str, Any]) -> int | None:
    """The model's size as zenow tells it, else the file's when this machine can see it (zenow is local)."""
    size = model.get("size")
    if isinstance(size, int):
        return size
    try:
        return os.stat(model["path"]).st_size
    except (OSError, KeyError, TypeError):
        return None


def models(api: ZenowAPI, out: Output, mode: str | None) -> int:
    """The registered models: name, mode, size, whether the file is there and whether it runs."""
    listed = api.get("/api/models/list", {"mode": mode} if mode else None)["models"]
    servers = statuses(api)
    rows: list[dict[str, Any]] = []
    for model in listed:
        server = servers.get(model.get("mode", ""), {})
        running = server.get("status") == "running" and server.get("model_path") == model.get("path")
        rows.append({**model, "size": _size_of(model), "running": running})
    if out.as_json:
        out.json(rows)
        return 0
    out.table("models", ["name", "mode", "size", "downloaded", "running", "path"], [
        [m["name"], m["mode"], human_size(m["size"]), "yes" if m.get("is_downloaded") else "no",
         "yes" if m["running"] else "no", m["path"]]
        for m in rows
    ])
    return 0


def sessions(api: ZenowAPI, out: Output, limit: int = 100) -> int:
    """The saved sessions, most recently updated first."""
    page = api.get("/api/sessions", {"limit": limit})
    if out.as_json:
        out.json(page)
        return 0
    out.table(f"sessions ({page['total']})", ["id", "name", "messages", "tokens", "updated"], [
        [str(s["id"]), s["session_name"], str(s["message_count"]), str(s["total_tokens"]), s["updated_at"]]
        for s in page["sessions"]
    ])
    return 0


def load_model(api: ZenowAPI, out: Output, name: str, mode: str) -> dict[str, Any]:
    """Make `name` the running model of `mode`; a spinner on a terminal meanwhile.  Returns zenow's answer."""
    waiting: AbstractContextManager[Any] = (
        out.console.status(f"loading {name} ({mode})…") if out.is_terminal else nullcontext()
    )
    with waiting:
        answer: dict[str, Any] = api.post("/api/models/load", {"model_name": name, "mode": mode},
                                          timeout=LOAD_TIMEOUT)
    if not answer.get("success", False):
        raise ClientError(answer.get("message") or f"could not load {name}")
    return answer


def load(api: ZenowAPI, out: Output, name: str, mode: str) -> int:
    """`zenow load NAME`: load it and say so."""
    answer = load_model(api, out, name, mode)
    if out.as_json:
        out.json(answer)
    else:
        out.line(f"{answer.get('model_name') or name} is {answer.get('server_status', 'running')} ({mode})")
    return 0

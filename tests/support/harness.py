"""Run zenow for tests: in-process on a real socket, or as a real `zenow serve` subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

from zenow.service import serve
from zenow.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def make_settings(home: Path, **overrides: object) -> Settings:
    """Settings for a test: port 0 on loopback, the given home, fast shutdown."""
    values: dict[str, object] = {"home": home, "host": "127.0.0.1", "port": 0, "graceful_timeout": 1.0}
    values.update(overrides)
    return Settings.from_environment({"PATH": os.environ.get("PATH", "")}, **values)


@dataclass
class RunningZenow:
    settings: Settings
    url: str
    client: httpx.AsyncClient
    shutdown: trio.Event
    cancel_scope: trio.CancelScope


@asynccontextmanager
async def start_zenow(nursery: trio.Nursery, settings: Settings) -> AsyncIterator[RunningZenow]:
    """Serve zenow in `nursery`; on exit shut it down gracefully and wait until it stopped."""
    shutdown = trio.Event()
    stopped = trio.Event()
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        try:
            with scope:
                await serve(settings, shutdown=shutdown, task_status=task_status)
        finally:
            stopped.set()

    host, port = await nursery.start(run)
    url = f"http://{host}:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            yield RunningZenow(settings, url, client, shutdown, scope)
    finally:
        shutdown.set()
        with trio.move_on_after(30) as waited:
            await stopped.wait()
        if waited.cancelled_caught:
            scope.cancel()
            await stopped.wait()


async def respawn(zenow: RunningZenow) -> None:
    """Restart the llm's fake child (a server parameter change does) so that it takes the test's
    FAKE_LLAMA_* environment."""
    batch = (await zenow.client.get("/api/models/get_param")).json()["batch_size"]
    answer = await zenow.client.post("/api/models/update_param", json={"batch_size": 256 if batch == 512 else 512})
    assert answer.json()["requires_restart"] is True
    assert (await zenow.client.get("/api/server/status")).json()["status"] == "running"


async def wait_for(predicate, *, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll an async `predicate` until it returns a truthy value; fail after `timeout`."""
    with trio.move_on_after(timeout):
        while True:
            value = await predicate()
            if value:
                return value
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def create_session(client: httpx.AsyncClient, first_message: str = "你好，请介绍一下自己") -> dict:
    """`POST /api/sessions`; asserts success and returns the answer (`session_id`, `session_name`)."""
    response = await client.post("/api/sessions", json={"first_message": first_message})
    assert response.status_code == 200, response.text
    return response.json()


async def add_message(client: httpx.AsyncClient, session_id: int, role: str, content: str) -> dict:
    """`POST /api/sessions/{id}/messages`; asserts success and returns the answer."""
    response = await client.post(f"/api/sessions/{session_id}/messages", json={"role": role, "content": content})
    assert response.status_code == 200, response.text
    return response.json()


async def status(client: httpx.AsyncClient, mode: str = "llm") -> dict:
    """`GET /api/server/status` of one mode."""
    return (await client.get("/api/server/status", params={"mode": mode})).json()


async def wait_status(client: httpx.AsyncClient, wanted: str, mode: str = "llm", timeout: float = 60) -> dict:
    """Poll a mode's server status until it is `wanted`; return that status."""
    async def reached():
        current = await status(client, mode)
        return current if current["status"] == wanted else None

    return await wait_for(reached, timeout=timeout, what=f"the {mode} server to be {wanted}")


@dataclass
class ZenowProcess:
    """A real `python -m zenow serve` child process."""

    process: trio.Process
    url: str
    log: list[str] = field(default_factory=list)


_SERVING = re.compile(rb"zenow serving on (http://[\d.]+:\d+)")


async def spawn_zenow(nursery: trio.Nursery, home: Path, *extra: str, env: dict[str, str] | None = None,
                      port: int = 0) -> ZenowProcess:
    """Start `zenow serve --port 0 --home HOME` and wait until it serves; its stderr is collected."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "zenow", "serve", "--port", str(port), "--home", str(home), *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})}, cwd=REPO,
    )
    running = ZenowProcess(proc, "")
    ready = trio.Event()

    async def read_stderr() -> None:
        buffer = b""
        assert proc.stderr is not None
        async for chunk in proc.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                running.log.append(line.decode(errors="replace"))
                match = _SERVING.search(line)
                if match and not ready.is_set():
                    running.url = match.group(1).decode()
                    ready.set()
        ready.set()

    nursery.start_soon(read_stderr)
    nursery.start_soon(_kill_when_left_behind, proc)
    with trio.fail_after(60):
        await ready.wait()
    if not running.url:
        raise AssertionError("zenow exited before serving:\n" + "\n".join(running.log))
    return running


async def _kill_when_left_behind(process: trio.Process) -> None:
    """Kill a spawned zenow still running when its test ends (a failing test included)."""
    try:
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def run_zenow_to_exit(home: Path, *extra: str, timeout: float = 60) -> tuple[int, str]:
    """Run `zenow serve` expecting it to exit by itself; return (exit code, stderr)."""
    with trio.fail_after(timeout):
        result = await trio.run_process(
            [sys.executable, "-m", "zenow", "serve", "--home", str(home), *extra],
            capture_stdout=True, capture_stderr=True, check=False, cwd=REPO,
        )
    return result.returncode, result.stderr.decode()


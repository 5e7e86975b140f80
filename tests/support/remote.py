"""A server the tests start as a mode's remote backend (`backend_url`): the real llama-server
or the fake, on a free port of 127.0.0.1, that a test can stop and start again on that port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import trio

from tests.support.harness import wait_for
from tests.support.llama import FAKE_LLAMA_SERVER
from zenow.servers._actor import free_port


@dataclass
class RemoteServer:
    """One llama-server-like process; `argv` without `--port`, which `start` adds."""

    argv: list[str]
    key: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start it and wait until it serves (`/v1/models` answers 200 to its key)."""
        self.process = await trio.lowlevel.open_process(
            [*self.argv, "--host", "127.0.0.1", "--port", str(self.port), "--api-key", self.key],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, **self.env})

        async def serving() -> bool:
            assert self.process is not None and self.process.returncode is None, "the remote server exited"
            try:
                async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
                    response = await http.get(f"{self.url}/v1/models",
                                              headers={"Authorization": f"Bearer {self.key}"})
            except httpx.HTTPError:
                return False
            return response.status_code == 200

        await wait_for(serving, timeout=60, what=f"the remote server on {self.url}")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()


@asynccontextmanager
async def remote_server(argv: list[str], key: str, **env: str) -> AsyncIterator[RemoteServer]:
    """A started `RemoteServer`, stopped (and reaped) at the end."""
    server = RemoteServer(argv, key, env)
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


def fake_argv(model: str = "remote-model.gguf", *flags: str) -> list[str]:
    return [sys.executable, str(FAKE_LLAMA_SERVER), "-m", model, *flags]


def chat_text(raw: str) -> str:
    """The reply an `/api/chat` SSE body streamed (it must end with `[DONE]` and hold no error)."""
    assert raw.endswith("data: [DONE]\n\n"), raw[-300:]
    text = ""
    for event in raw.split("\n\n")[:-2]:
        payload = json.loads(event.removeprefix("data: "))
        assert "error" not in payload, payload
        text += payload["choices"][0]["delta"].get("content") or ""
    return text

"""A model split across llama.cpp RPC workers (`rpc_servers`), with real rpc-server processes."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.support.harness import make_settings, start_zenow, wait_for, wait_status

pytestmark = pytest.mark.real_llama

ASK = {"messages": [{"role": "user", "content": "Name three colours."}], "temperature": 0, "seed": 7,
       "max_tokens": 24}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    port: int
    process: trio.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def workers(llama_server: str, count: int) -> AsyncIterator[list[Worker]]:
    started = [Worker(free_port()) for _ in range(count)]
    try:
        for worker in started:
            await start_worker(llama_server, worker)
        yield started
    finally:
        for worker in started:
            await stop_worker(worker)


async def start_worker(llama_server: str, worker: Worker) -> None:
    rpc_server = str(Path(llama_server).with_name("rpc-server"))
    worker.process = await trio.lowlevel.open_process(
        [rpc_server, "--host", "127.0.0.1", "--port", str(worker.port), "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def listening() -> bool:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", worker.port)
        except OSError:
            return False
        await stream.aclose()
        return True

    await wait_for(listening, timeout=20, what=f"rpc-server on {worker.address}")


async def stop_worker(worker: Worker) -> None:
    if worker.process is not None and worker.process.returncode is None:
        worker.process.kill()
        with trio.CancelScope(shield=True):
            await worker.process.wait()


async def answer(client) -> str:
    response = await client.post("/v1/chat/completions", json=ASK)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


async def test_a_model_split_across_two_workers_answers_as_without_them(nursery, tmp_path, llama_server, smollm2):
    settings = make_settings(tmp_path / "home", llama_server=llama_server, default_llm=smollm2, restart_backoff=0.2)
    async with workers(llama_server, 2) as (first, second), start_zenow(nursery, settings) as zenow:
        client = zenow.client
        await wait_status(client, "running", "llm")
        alone = await answer(client)

        update = await client.post("/api/models/update_param", params={"mode": "llm"},
                                   json={"rpc_servers": [first.address, second.address]})
        assert update.status_code == 200, update.text
        assert update.json()["requires_restart"] is True
        await wait_status(client, "running", "llm")
        assert (await client.get("/api/models/get_param", params={"mode": "llm"})).json()["rpc_servers"] == [
            first.address, second.address]
        assert await answer(client) == alone  # greedy, same seed: the same text, computed across machines
        log = (settings.logs_dir / "llama-server-llm.log").read_text(errors="replace")
        assert f"using device RPC0 ({first.address})" in log and f"using device RPC1 ({second.address})" in log
        assert f"RPC0[{first.address}] model buffer size" in log  # layers really placed on the workers

        # a worker dies: the mode reports it by name, and comes back when the worker does
        await stop_worker(first)
        await client.post("/v1/chat/completions", json=ASK)  # whatever this answers, the child notices

        async def error_naming_the_worker() -> dict | None:
            status = (await client.get("/api/server/status", params={"mode": "llm"})).json()
            message = status["error_message"] or ""
            return status if status["status"] == "error" and first.address in message else None

        failed = await wait_for(error_naming_the_worker, timeout=60, what="an error naming the dead worker")
        assert "cannot be reached" in failed["error_message"]
        await start_worker(llama_server, first)
        await wait_status(client, "running", "llm", timeout=90)
        assert await answer(client) == alone


async def test_a_worker_that_is_not_there_is_named_at_start(nursery, tmp_path, llama_server, smollm2):
    settings = make_settings(tmp_path / "home", llama_server=llama_server, default_llm=smollm2)
    absent = f"127.0.0.1:{free_port()}"
    async with start_zenow(nursery, settings) as zenow:
        await wait_status(zenow.client, "running", "llm")
        update = await zenow.client.post("/api/models/update_param", params={"mode": "llm"},
                                         json={"rpc_servers": [absent]})
        assert update.status_code == 200
        status = await wait_status(zenow.client, "error", "llm")
        assert absent in status["error_message"] and "zenow worker" in status["error_message"]
        bad = await zenow.client.post("/api/models/update_param", params={"mode": "llm"},
                                      json={"rpc_servers": ["no port here"]})
        assert bad.status_code == 400 and "rpc_servers" in bad.json()["detail"]
        cleared = await zenow.client.post("/api/models/update_param", params={"mode": "llm"},
                                          json={"rpc_servers": []})
        assert cleared.status_code == 200
        await wait_status(zenow.client, "running", "llm")
        assert os.path.exists(settings.logs_dir / "llama-server-llm.log")

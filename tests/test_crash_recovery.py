"""zenow SIGKILLed in the middle of work, then started again on the same home.

Every message acknowledged before the kill is there, the database passes its integrity
check, the current model starts again, no llama-server of the old run is left, and a
download cut by the kill resumes from its `.part` and finishes with the right bytes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
from contextlib import closing

import httpx
import pytest
import trio

from tests.support.file_server import EMPTY_GGUF_HEADER, FileServer
from tests.support.harness import add_message, create_session, spawn_zenow, wait_for, wait_status


def llama_servers_of(pid: int) -> list[int]:
    """Live llama-server processes whose parent is `pid` (zombies, state Z, do not count)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and b"llama-server" in command:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def integrity(database) -> str:
    with closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


async def kill(zenow) -> None:
    zenow.process.send_signal(signal.SIGKILL)
    await zenow.process.wait()


@pytest.mark.real_llama
async def test_killed_during_a_streamed_chat_then_started_again(nursery, tmp_path, llama_server, smollm2):
    home = tmp_path / "home"
    env = {"ZENOW_LLAMA_SERVER": llama_server}
    zenow = await spawn_zenow(nursery, home, "--default-llm", str(smollm2), env=env)
    async with httpx.AsyncClient(base_url=zenow.url, timeout=60) as client:
        await wait_status(client, "running", "llm")
        (child,) = llama_servers_of(zenow.process.pid)
        sid = (await create_session(client, "survives a kill"))["session_id"]
        await add_message(client, sid, "user", "acknowledged before the kill")
        body = {"session_id": sid, "stream": True, "max_tokens": 400, "temperature": 0,
                "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]}
        deltas = 0
        async with client.stream("POST", "/api/chat", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"delta"' in line:
                    deltas += 1
                    if deltas == 5:
                        await kill(zenow)
                        break
    assert deltas == 5
    with trio.fail_after(2):  # the child dies with zenow (parent-death signal)
        while alive(child):
            await trio.sleep(0.02)
    assert integrity(home / "zenow.db") == "ok"

    again = await spawn_zenow(nursery, home, env=env)  # no --default-llm: the current model is stored
    try:
        async with httpx.AsyncClient(base_url=again.url, timeout=60) as client:
            running = await wait_status(client, "running", "llm")
            assert running["model_path"] == str(smollm2.resolve())
            messages = (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
            contents = [m["content"] for m in messages]
            assert contents[:2] == ["acknowledged before the kill", body["messages"][0]["content"]]
            session = (await client.get(f"/api/sessions/{sid}")).json()
            assert session["message_count"] == len(messages)
            # and the service works as before: a chat on the same session answers
            answer = await client.post("/api/chat", json={**body, "stream": False, "max_tokens": 8})
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    finally:
        again.process.terminate()
        await again.process.wait()
    assert integrity(home / "zenow.db") == "ok"


async def test_killed_during_a_download_then_it_resumes_from_its_part(nursery, tmp_path):
    data = EMPTY_GGUF_HEADER + os.urandom(3 * 2**20)
    digest = hashlib.sha256(data).hexdigest()
    files = FileServer()
    await files.start(nursery)
    served = files.add("/model.gguf", data, holds=[2 * 2**20])  # the first request stalls after 2 MiB
    url = files.url("/model.gguf")
    home = tmp_path / "home"
    part = home / "models" / "llm" / "model.gguf.part"

    zenow = await spawn_zenow(nursery, home)
    async with httpx.AsyncClient(base_url=zenow.url, timeout=30) as client:
        started = await client.post("/api/models/download", json={"url": url, "mode": "llm", "sha256": digest})
        assert started.status_code == 200, started.text

        async def part_written() -> bool:
            return part.exists() and part.stat().st_size >= 2**20

        await wait_for(part_written, what="the .part to hold at least 1 MiB")
        await kill(zenow)
    on_disk = part.stat().st_size
    assert 0 < on_disk < len(data)
    assert integrity(home / "zenow.db") == "ok"

    again = await spawn_zenow(nursery, home)
    try:
        async with httpx.AsyncClient(base_url=again.url, timeout=30) as client:
            record = (await client.get("/api/models/download/status", params={"url": url})).json()["download"]
            assert record["status"] == "failed" and "interrupted" in record["error"]
            assert record["downloaded"] == on_disk
            resumed = await client.post("/api/models/download", json={"url": url, "mode": "llm", "sha256": digest})
            assert resumed.status_code == 200, resumed.text

            async def completed() -> dict | None:
                current = (await client.get("/api/models/download/status", params={"url": url})).json()["download"]
                return current if current["status"] != "downloading" else None

            final = await wait_for(completed, what="the resumed download to end")
            assert final["status"] == "completed", final
            models = (await client.get("/api/models/list", params={"mode": "llm"})).json()["models"]
            assert [m["name"] for m in models] == ["model"]
    finally:
        again.process.terminate()
        await again.process.wait()
    target = home / "models" / "llm" / "model.gguf"
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
    assert not part.exists()
    assert served.ranges_asked[-1] == f"bytes={on_disk}-"  # resumed, not fetched again

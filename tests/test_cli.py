"""`zenow serve` as a real process: clean shutdown, one zenow per home, a taken port."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys

import httpx
import trio

from tests.support.harness import REPO, run_zenow_to_exit, spawn_zenow


async def test_sigterm_stops_cleanly_with_the_database_intact(nursery, tmp_path):
    home = tmp_path / "home"
    zenow = await spawn_zenow(nursery, home)
    async with httpx.AsyncClient(base_url=zenow.url) as client:
        sid = (await client.post("/api/sessions", json={"first_message": "persist me"})).json()["session_id"]
        await client.post(f"/api/sessions/{sid}/messages", json={"role": "user", "content": "still here"})
    zenow.process.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        code = await zenow.process.wait()
    assert code == 0, "\n".join(zenow.log)
    with sqlite3.connect(home / "zenow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT content FROM messages").fetchall() == [("still here",)]

    # and the next zenow on that home sees the same data
    again = await spawn_zenow(nursery, home)
    async with httpx.AsyncClient(base_url=again.url) as client:
        assert (await client.get(f"/api/sessions/{sid}")).json()["message_count"] == 1
    again.process.send_signal(signal.SIGINT)
    with trio.fail_after(30):
        assert await again.process.wait() == 0


async def test_a_second_zenow_on_the_same_home_is_refused(nursery, tmp_path):
    home = tmp_path / "home"
    first = await spawn_zenow(nursery, home)
    code, stderr = await run_zenow_to_exit(home, "--port", "0")
    assert code != 0
    lines = [line for line in stderr.splitlines() if line.startswith("zenow:")]
    assert lines == [f"zenow: another zenow is already running with home {home}"], stderr
    assert "Traceback" not in stderr
    first.process.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        assert await first.process.wait() == 0


async def test_the_home_lock_is_released_when_zenow_is_killed(nursery, tmp_path):
    home = tmp_path / "home"
    first = await spawn_zenow(nursery, home)
    first.process.send_signal(signal.SIGKILL)
    await first.process.wait()
    second = await spawn_zenow(nursery, home)
    second.process.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        assert await second.process.wait() == 0


async def test_a_port_in_use_is_one_line_and_a_non_zero_exit(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, stderr = await run_zenow_to_exit(tmp_path / "home", "--port", str(port))
    assert code != 0
    assert f"zenow: port {port} on 127.0.0.1 is already in use" in stderr.splitlines()
    assert "Traceback" not in stderr


async def test_a_database_that_cannot_be_opened_is_reported(tmp_path):
    home = tmp_path / "home"
    (home / "zenow.db").mkdir(parents=True)  # a directory where the database file should be
    code, stderr = await run_zenow_to_exit(home, "--port", "0")
    assert code != 0
    assert f"Cannot open the database {home / 'zenow.db'}" in stderr
    assert "Traceback" not in stderr


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "zenow", "serve", "--help"], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout
    for option in ("--host", "--port", "--home", "--default-llm", "--llama-server", "--cors-origin", "ZENOW_HOME"):
        assert option in out
    top = subprocess.run([sys.executable, "-m", "zenow", "--help"], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert "serve" in top


async def test_a_malformed_stream_batch_window_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("ZENOW_STREAM_BATCH_MS", "soon")
    code, stderr = await run_zenow_to_exit(tmp_path / "home", "--port", "0")
    assert code == 2
    assert "zenow: the stream batch window is a number of milliseconds, not 'soon'" in stderr.splitlines()
    monkeypatch.setenv("ZENOW_STREAM_BATCH_MS", "250")
    code, stderr = await run_zenow_to_exit(tmp_path / "home", "--port", "0")
    assert (code, stderr.strip()) == (2, "zenow: the stream batch window must be 0 to 200 ms, not 250")
    monkeypatch.delenv("ZENOW_STREAM_BATCH_MS")
    code, stderr = await run_zenow_to_exit(tmp_path / "home", "--port", "0", "--stream-batch-ms", "-1")
    assert code == 2 and "the stream batch window must be 0 to 200 ms, not -1" in stderr
    assert "Traceback" not in stderr


async def test_a_malformed_prefill_switch_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("ZENOW_PREFILL_NEXT_TURN", "later")
    code, stderr = await run_zenow_to_exit(tmp_path / "home", "--port", "0")
    assert (code, stderr.strip()) == (2, "zenow: ZENOW_PREFILL_NEXT_TURN is on or off, not 'later'")
    monkeypatch.delenv("ZENOW_PREFILL_NEXT_TURN")
    code, stderr = await run_zenow_to_exit(tmp_path / "home", "--port", "0", "--prefill-next-turn", "maybe")
    assert code == 2 and "--prefill-next-turn: invalid choice: 'maybe'" in stderr

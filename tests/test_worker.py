"""`zenow worker`: llama.cpp's rpc-server in the foreground, on loopback unless --insecure."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import trio

from tests.support.harness import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_a_worker_reachable_from_other_machines_is_refused_without_insecure(host):
    result = subprocess.run([sys.executable, "-m", "zenow", "worker", "--host", host], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "no authentication" in result.stderr and "--insecure" in result.stderr


def test_the_help_says_rpc_server_has_no_authentication():
    result = subprocess.run([sys.executable, "-m", "zenow", "worker", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert "NO authentication" in " ".join(result.stdout.split()) and "SSH tunnel" in result.stdout


@pytest.mark.real_llama
async def test_the_worker_becomes_rpc_server_and_listens(llama_server):
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "zenow", "worker", "--port", str(port), "--threads", "1"],
        cwd=REPO, env={**os.environ, "ZENOW_LLAMA_SERVER": llama_server},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(20):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                    await stream.aclose()
                    break
                except OSError:
                    assert process.poll() is None, "the worker exited"
                    await trio.sleep(0.05)
        # it is rpc-server itself, in the foreground: no extra process to own
        assert os.readlink(f"/proc/{process.pid}/exe").endswith("rpc-server")
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            await process.wait()

"""Spawning children that die with zenow, from a thread that lives as long as zenow.

`PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the
process.  trio spawns from its worker threads, which exit after ~10 s idle, and
that kills a healthy child.  So every child is forked by one dedicated thread
that never exits while the process lives; the signal then fires exactly when
zenow dies, however it dies (SIGKILL included).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

__all__ = ["spawn_owned", "terminate", "wait_exit"]

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _die_with(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the line above took effect
            os._exit(1)

    return preexec


class _SpawnerThread:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="zenow-spawner", daemon=True).start()

    def _serve(self) -> None:
        while True:  # never returns: its exit would kill every child it forked
            job, future = self._jobs.get()
            try:
                future.set_result(job())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(exc)

    def submit(self, job: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future


_spawner: _SpawnerThread | None = None
_spawner_lock = threading.Lock()


def _the_spawner() -> _SpawnerThread:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _SpawnerThread()
        return _spawner


async def spawn_owned(
    argv: Sequence[str], *, env: Mapping[str, str], output_fd: int, cwd: str | None = None
) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr on `output_fd`, in its own session, killed if zenow dies.

    Raises `OSError` when the program cannot be started (not found, not executable).
    The caller owns the child: it must `terminate` it or `wait_exit` for it.
    """
    job = lambda: subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=output_fd, stderr=output_fd, env=dict(env),
        cwd=cwd, close_fds=True, start_new_session=True, preexec_fn=_die_with(os.getpid()),
    )
    # Shielded: once the fork is queued it happens, and its caller must get the child to own it.
    with trio.CancelScope(shield=True):
        future = _the_spawner().submit(job)
        process: subprocess.Popen[bytes] = await trio.to_thread.run_sync(future.result)
    return process


async def wait_exit(process: subprocess.Popen[bytes]) -> int:
    """Wait until `process` exits, without blocking trio; reap it and return its exit code."""
    if process.returncode is not None:
        return process.returncode
    pidfd = os.pidfd_open(process.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return process.wait()  # the child is a zombie now: this returns at once


async def terminate(process: subprocess.Popen[bytes], grace: float) -> int:
    """SIGTERM, up to `grace` seconds, then SIGKILL; always reaps.  Shielded from cancellation."""
    with trio.CancelScope(shield=True):
        if process.returncode is None:
            _signal(process, signal.SIGTERM)
            with trio.move_on_after(grace):
                await wait_exit(process)
            if process.returncode is None:
                _signal(process, signal.SIGKILL)
        code = await wait_exit(process)
    return code


def _signal(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        process.send_signal(signum)
    except ProcessLookupError:
        pass

"""`zenow worker`: this machine lends its CPU (or GPU) to another zenow's model, through
llama.cpp's RPC backend.

The worker is llama.cpp's own `rpc-server`, run in the foreground in place of this process
(so signals, exit codes and logs are its own).  A zenow elsewhere names it in a mode's
`rpc_servers` parameter (`host:port`), and that mode's llama-server splits the model's
layers across the workers and its own machine.

rpc-server has no authentication and no encryption: whoever reaches its port can run
work on it and read what it is sent.  So it listens on 127.0.0.1 unless `--insecure`;
reach it from the zenow machine through an SSH tunnel (`ssh -N -L 50052:127.0.0.1:50052
worker-host`, then `rpc_servers: ["127.0.0.1:50052"]`) or bind it to a private network
you trust with `--host ADDRESS --insecure`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .app import is_loopback
from .errors import ZenowError
from .servers import find_rpc_server
from .settings import Settings

__all__ = ["WorkerRefused", "worker_command", "run_worker"]


class WorkerRefused(ZenowError):
    """The worker would be reachable from other machines without `--insecure`."""


def worker_command(settings: Settings, host: str, port: int, threads: int | None, insecure: bool) -> list[str]:
    """The rpc-server command line for these options.

    Raises `WorkerRefused` for a non-loopback `host` without `insecure`, and
    `ServerStartFailed` when no rpc-server is found.
    """
    if not is_loopback(host) and not insecure:
        raise WorkerRefused(
            f"refusing to listen on {host}: rpc-server has no authentication, so anyone who can reach it could "
            "use this machine. Reach it over an SSH tunnel instead, or give --insecure on a network you trust"
        )
    if not 0 < port < 65536:
        raise WorkerRefused(f"--port must be 1-65535, got {port}")
    argv = [find_rpc_server(settings), "--host", host, "--port", str(port)]
    if threads is not None:
        argv += ["--threads", str(threads)]
    return argv


def run_worker(argv: Sequence[str]) -> None:
    """Become the rpc-server `argv` names (never returns; raises `OSError` when it cannot run)."""
    os.execv(argv[0], list(argv))

"""Finding the llama-server binary (the same order as ops/provide-llama-server.sh)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import ServerStartFailed
from ..settings import Settings

#: The llama-cpp-python sdist whose vendored llama.cpp ops/provide-llama-server.sh builds.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
#: The build flavour in the script's cache key (bumped when its build flags change).
LLAMA_SERVER_BUILD = "b2"


def cached_binary(cache_root: Path, name: str = "llama-server") -> Path:
    """Where ops/provide-llama-server.sh caches `name` (llama-server or rpc-server)."""
    folder = f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-{LLAMA_SERVER_BUILD}"
    return cache_root / "zenow-llama-server" / folder / "bin" / name


def find_llama_server(settings: Settings) -> str:
    """The llama-server to run: the configured one, else `llama-server` on PATH, else the
    one ops/provide-llama-server.sh built.  Raises `ServerStartFailed` saying how to get one."""
    if settings.llama_server:
        if os.access(settings.llama_server, os.X_OK) and os.path.isfile(settings.llama_server):
            return settings.llama_server
        raise ServerStartFailed(f"Failed to start llama-server: {settings.llama_server} is not an executable file")
    on_path = shutil.which("llama-server", path=settings.search_path or None)
    if on_path:
        return on_path
    built = cached_binary(settings.cache_root)
    if os.access(built, os.X_OK):
        return str(built)
    raise ServerStartFailed(
        "Failed to start llama-server: command not found. Run `make run` (it builds one with "
        "ops/provide-llama-server.sh), or set ZENOW_LLAMA_SERVER / --llama-server to an existing binary."
    )


def find_rpc_server(settings: Settings) -> str:
    """llama.cpp's RPC worker: the configured one (ZENOW_RPC_SERVER), else the `rpc-server` next to
    the configured llama-server, else `rpc-server` on PATH, else the one ops/provide-llama-server.sh
    built.  Raises `ServerStartFailed` saying how to get one."""
    candidates = []
    if settings.rpc_server:
        if os.access(settings.rpc_server, os.X_OK) and os.path.isfile(settings.rpc_server):
            return settings.rpc_server
        raise ServerStartFailed(f"Failed to start rpc-server: {settings.rpc_server} is not an executable file")
    if settings.llama_server:
        candidates.append(Path(settings.llama_server).with_name("rpc-server"))
    on_path = shutil.which("rpc-server", path=settings.search_path or None)
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(cached_binary(settings.cache_root, "rpc-server"))
    for candidate in candidates:
        if os.access(candidate, os.X_OK) and candidate.is_file():
            return str(candidate)
    raise ServerStartFailed(
        "Failed to start rpc-server: command not found. Run `make run` (ops/provide-llama-server.sh builds it "
        "next to llama-server), or set ZENOW_RPC_SERVER to an existing binary."
    )

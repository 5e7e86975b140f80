"""How much memory a model load needs, and how much the machine has (trio-free, blocking reads of /proc).

The estimate is deliberately simple: the model file (llama-server maps all of it),
an f16 KV cache for the context (from the GGUF header's shape), and a margin for
compute buffers and the process itself.  It is meant to refuse loads that cannot
fit, with a message a user can act on, not to predict usage to the megabyte.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ._gguf import GGUFInfo

__all__ = ["MemoryProbe", "anonymous_memory_of", "load_needs", "mem_available", "usable_cores"]

#: Returns the bytes of memory available for a new process now, or None when unknown.
MemoryProbe = Callable[[], int | None]

#: Compute buffers, the process and its libraries: a floor, plus a share of the rest.
MARGIN_FLOOR = 256 * 2**20
MARGIN_SHARE = 0.10

MEMINFO = Path("/proc/meminfo")


def load_needs(info: GGUFInfo, n_ctx: int) -> int:
    """Bytes of memory a llama-server needs to serve the model described by `info` with `n_ctx` tokens."""
    base = info.file_size + info.kv_cache_bytes(n_ctx)
    return base + MARGIN_FLOOR + int(base * MARGIN_SHARE)


def mem_available(meminfo: Path = MEMINFO) -> int | None:
    """`MemAvailable` from /proc/meminfo in bytes, or None where the kernel does not say."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            try:
                return int(parts[1]) * (1024 if parts[2:] == ["kB"] else 1)
            except (IndexError, ValueError):
                return None
    return None


def anonymous_memory_of(pid: int) -> int:
    """The anonymous resident memory of process `pid` (`RssAnon`) in bytes: what stopping it frees
    beyond the page cache that MemAvailable already counts; 0 when unknown."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("RssAnon:"):
            parts = line.split()
            try:
                return int(parts[1]) * 1024
            except (IndexError, ValueError):
                return 0
    return 0


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)

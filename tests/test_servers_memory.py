"""What a load needs and what the machine has (zenow.servers._memory)."""

from __future__ import annotations

import os

from zenow.servers._gguf import read_gguf_info
from zenow.servers._memory import (
    MARGIN_FLOOR,
    anonymous_memory_of,
    load_needs,
    mem_available,
    usable_cores,
)


def test_mem_available_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:          100000 kB\nMemAvailable:    2097152 kB\n")
    assert mem_available(meminfo) == 2 * 2**30
    meminfo.write_text("MemTotal:       24576000 kB\n")  # an old kernel: unknown
    assert mem_available(meminfo) is None
    assert mem_available(tmp_path / "absent") is None


def test_this_machine_says_something_sensible():
    available = mem_available()
    assert available is not None and available > 0
    assert anonymous_memory_of(os.getpid()) > 0
    assert anonymous_memory_of(2**22 + 12345) == 0  # no such process
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


def test_a_load_needs_the_file_the_kv_cache_and_a_margin(smollm2):
    info = read_gguf_info(smollm2)
    kv = 180 * 2**20  # at 8192 tokens
    base = info.file_size + kv
    assert load_needs(info, 8192) == base + MARGIN_FLOOR + int(base * 0.10)
    assert load_needs(info, 131072) - load_needs(info, 8192) > 15 * kv  # the cache grows with the context

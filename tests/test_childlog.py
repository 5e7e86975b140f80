"""A child's log file written in batches (zenow/servers/_childlog.py)."""

from __future__ import annotations

import trio

from zenow.servers._childlog import FLUSH_INTERVAL, MAX_PENDING, ChildLog


async def test_lines_wait_for_one_batched_write_in_their_order(tmp_path):
    path = tmp_path / "child.log"
    log = ChildLog(path, "llm")
    await log.open(b"--- header\n")
    lines = [b"line %d\n" % i for i in range(1000)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run)
        for line in lines:
            await log.add(line)
        assert path.read_bytes() == b""  # nothing written per line
        await trio.sleep(FLUSH_INTERVAL * 5)
        assert path.read_bytes() == b"--- header\n" + b"".join(lines)  # one write, in order
        await log.add(b"later\n")
        await trio.sleep(FLUSH_INTERVAL * 5)
        assert path.read_bytes().endswith(b"line 999\nlater\n")
        nursery.cancel_scope.cancel()
    await log.add(b"last words\n")
    await log.close()  # what waits is written at the end
    assert path.read_bytes().endswith(b"later\nlast words\n")


async def test_a_flood_is_written_at_once_past_the_limit(tmp_path):
    path = tmp_path / "child.log"
    log = ChildLog(path, "llm")
    await log.open(b"")
    await log.add(b"x" * (MAX_PENDING // 2))
    assert path.stat().st_size == 0
    await log.add(b"y" * (MAX_PENDING // 2))  # the limit reached: written before add returns
    assert path.stat().st_size == MAX_PENDING
    await log.close()


async def test_a_log_that_cannot_be_written_is_given_up_quietly(tmp_path, caplog):
    log = ChildLog(tmp_path / "missing-folder" / "child.log", "embed")
    await log.open(b"--- header\n")
    await log.add(b"output\n")  # no file: dropped, never raised
    await log.close()
    assert any("cannot write" in r.getMessage() and "embed" in r.getMessage() for r in caplog.records)

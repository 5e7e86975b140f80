"""Handing items over trio memory channels on a stream's hot path (one call per token).

`send_soon` hands an item over without a checkpoint when the channel has room: the
producer's next read of its socket is a checkpoint anyway, and a yield after every
item made the consumer write one event at a time while the producer waited (measured in
bench/RESULTS.md, stream fan-in).  `receive_waiting` takes, after one item, every item
already waiting, so the consumer sends them in one write.
"""

from __future__ import annotations

import contextlib
from typing import TypeVar

import trio

__all__ = ["receive_waiting", "send_soon"]

T = TypeVar("T")


async def send_soon(channel: trio.MemorySendChannel[T], item: T) -> None:
    """Send `item`; wait (a checkpoint) only when the channel's buffer is full."""
    try:
        channel.send_nowait(item)
    except trio.WouldBlock:
        await channel.send(item)


def receive_waiting(first: T, channel: trio.MemoryReceiveChannel[T]) -> list[T]:
    """`first` and every item waiting in `channel` after it, without waiting."""
    items = [first]
    with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
        while True:
            items.append(channel.receive_nowait())
    return items

"""The stream hand-over helpers (zenow/channels.py)."""

from __future__ import annotations

import trio
import trio.testing

from zenow.channels import receive_waiting, send_soon


async def test_send_soon_does_not_yield_while_there_is_room_and_waits_when_full():
    send, receive = trio.open_memory_channel[int](2)
    with trio.testing.assert_no_checkpoints():
        await send_soon(send, 1)
        await send_soon(send, 2)
    sent = trio.Event()

    async def third() -> None:
        await send_soon(send, 3)
        sent.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(third)  # full: waits for the reader
        await trio.testing.wait_all_tasks_blocked()
        assert not sent.is_set()
        assert receive_waiting(receive.receive_nowait(), receive) == [1, 2, 3]  # the waiting one moved in
    assert sent.is_set()


async def test_receive_waiting_takes_what_is_there_and_stops_at_the_end():
    send, receive = trio.open_memory_channel[str](8)
    for item in "bc":
        send.send_nowait(item)
    assert receive_waiting("a", receive) == ["a", "b", "c"]
    assert receive_waiting("z", receive) == ["z"]  # nothing waiting: no wait either
    send.close()
    assert receive_waiting("last", receive) == ["last"]  # the channel's end is not an error

"""The actor primitive and its supervisor, with fake time."""

from __future__ import annotations

import pytest
import trio

from zenow.actor import Actor, ActorHealth, RestartPolicy, Supervisor
from zenow.errors import ActorCrashed, ActorUnavailable, InvalidRequest


class Counter(Actor):
    instances = 0

    def __init__(self) -> None:
        Counter.instances += 1
        self.count = 0

    async def add(self, n: int) -> int:
        self.count += n
        return self.count

    async def refuse(self) -> None:
        raise InvalidRequest("no")

    async def crash(self) -> None:
        raise RuntimeError("bug")


@pytest.fixture(autouse=True)
def reset():
    Counter.instances = 0


async def test_calls_are_served_in_order_and_domain_errors_are_answers(nursery):
    ref = await Supervisor(nursery).start("counter", Counter)
    assert await ref.call(Counter.add, 2) == 2
    with pytest.raises(InvalidRequest):
        await ref.call(Counter.refuse)
    assert await ref.call(Counter.add, 3) == 5  # same instance: a domain error is no crash
    assert Counter.instances == 1


async def test_a_crashed_actor_is_restarted_with_fresh_state(nursery, autojump_clock):
    ref = await Supervisor(nursery).start("counter", Counter)
    await ref.call(Counter.add, 10)
    with pytest.raises(ActorCrashed, match="RuntimeError: bug"):
        await ref.call(Counter.crash)  # the caller gets an error naming the bug
    assert await ref.call(Counter.add, 1) == 1  # a new instance serves the same address
    assert Counter.instances == 2


async def test_a_non_critical_actor_that_keeps_crashing_is_given_up(nursery, autojump_clock):
    policy = RestartPolicy(max_restarts=3, window=60)
    health = ActorHealth()
    ref = await Supervisor(nursery, policy, health).start("counter", Counter)
    for _ in range(3):
        with pytest.raises(ActorCrashed):
            await ref.call(Counter.crash)
        assert health.down() == {}  # restarted, not given up
    with pytest.raises(ActorCrashed):
        await ref.call(Counter.crash)
    with pytest.raises(ActorUnavailable):
        await ref.call(Counter.add, 1)
    assert Counter.instances == 4
    assert list(health.down()) == ["counter"]
    assert "RuntimeError: bug" in health.down()["counter"]


async def test_keyword_arguments_reach_the_operation(nursery):
    class Greeter(Actor):
        async def greet(self, name: str, *, punctuation: str = ".") -> str:
            return f"hello {name}{punctuation}"

    ref = await Supervisor(nursery).start("greeter", Greeter)
    assert await ref.call(Greeter.greet, "you", punctuation="!") == "hello you!"


async def test_a_critical_actor_that_keeps_crashing_stops_its_supervisor(autojump_clock):
    with pytest.raises(BaseExceptionGroup) as caught:
        async with trio.open_nursery() as nursery:
            ref = await Supervisor(nursery, RestartPolicy(max_restarts=1)).start("store", Counter, critical=True)
            for _ in range(2):
                with pytest.raises(ActorCrashed):
                    await ref.call(Counter.crash)
            await trio.sleep_forever()
    assert caught.group_contains(RuntimeError, match="bug")


class BrokenAtStart(Actor):
    async def setup(self) -> None:
        raise OSError("disk gone")


async def test_an_actor_that_cannot_start_reports_why(nursery):
    with pytest.raises(OSError, match="disk gone"):
        await Supervisor(nursery).start("broken", BrokenAtStart, critical=True)


async def test_a_cancelled_caller_does_not_cancel_the_work(nursery):
    class Slow(Actor):
        done = trio.Event()

        async def work(self) -> None:
            await trio.sleep(0.05)
            Slow.done.set()

    ref = await Supervisor(nursery).start("slow", Slow)
    with trio.move_on_after(0.01):
        await ref.call(Slow.work)
    with trio.fail_after(5):
        await Slow.done.wait()


async def test_a_caller_never_receives_the_actors_cancellation(nursery):
    class Busy(Actor):
        async def setup(self) -> None:
            async def crash_later() -> None:
                await trio.sleep(0.05)
                raise RuntimeError("background bug")

            self.nursery.start_soon(crash_later)

        async def wait(self) -> None:
            await trio.sleep_forever()

    ref = await Supervisor(nursery).start("busy", Busy)
    with pytest.raises(ActorUnavailable):
        await ref.call(Busy.wait)  # the actor crashed under us: not a stray Cancelled

"""The kept first page of the session list (`Store.session_page`): every write is visible in the next
read, whoever wrote, however the writes and reads interleave, also when a writer stops waiting; and
the counters it shows stay equal to the messages stored.  Real store actor, real SQLite file."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.harness import add_message, create_session, make_settings, start_zenow, wait_for
from tests.support.tiny_models import write_stub_model
from tests.test_store_properties import operation as store_operation
from zenow.actor import Supervisor
from zenow.errors import SessionNotFound
from zenow.store import SessionInfo, Store, StoreActor
from zenow.store._pages import PageCache


def shape(sessions: list[SessionInfo], total: int) -> tuple[tuple[SessionInfo, ...], int]:
    return tuple(sessions), total


def other_shape(sessions: list[SessionInfo], total: int) -> list[int]:
    return [s.id for s in sessions]


async def open_store(nursery: trio.Nursery, path: Path) -> Store:
    return Store(await Supervisor(nursery).start("store", lambda: StoreActor(path), critical=True))


async def fresh(store: Store, limit: int) -> tuple[tuple[SessionInfo, ...], int]:
    """What the database says now (the uncached query)."""
    return shape(*await store.list_sessions(limit, 0))


#: The store property test's operations, and reads of the page between them (which fill the cache).
operation = st.one_of(store_operation, st.tuples(st.just("read"), st.sampled_from([1, 3, 100])))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, max_size=30))
def test_after_any_sequence_of_writes_the_kept_page_is_what_the_database_says(ops):
    async def scenario(folder: Path) -> None:
        async with trio.open_nursery() as nursery:
            store = await open_store(nursery, folder / "zenow.db")
            ids: list[int] = []
            for op in ops:
                try:
                    if op[0] == "create":
                        ids.append((await store.create_session(op[1] or "New chat")).id)
                    elif op[0] == "read":
                        await store.session_page(op[1], 0, shape)  # fills the cache between writes
                    elif not ids:
                        continue
                    elif op[0] == "add":
                        await store.add_message(ids[op[1] % len(ids)], op[2], op[3], op[4])
                    elif op[0] == "clear":
                        await store.clear_messages(ids[op[1] % len(ids)])
                    elif op[0] == "delete":
                        await store.delete_session(ids[op[1] % len(ids)])
                    else:
                        await store.rename_session(ids[op[1] % len(ids)], op[2])
                except SessionNotFound:
                    pass  # an operation on a session deleted earlier in the sequence
                for limit in (1, 3, 100):
                    assert await store.session_page(limit, 0, shape) == await fresh(store, limit)
            sessions, total = await store.session_page(100, 0, shape)
            assert total == len(sessions)
            for session in sessions:  # the counters shown are the messages stored
                messages, tokens = await store.get_messages(session.id, None)
                assert session.message_count == len(messages)
                assert session.total_tokens == tokens == sum(m.token_count for m in messages)
            nursery.cancel_scope.cancel()

    with tempfile.TemporaryDirectory() as folder:
        trio.run(scenario, Path(folder))


async def test_a_page_is_kept_per_limit_and_shape_and_only_the_first_page(nursery, tmp_path):
    store = await open_store(nursery, tmp_path / "zenow.db")
    for i in range(5):
        await store.create_session(f"s{i}")
    first = await store.session_page(3, 0, shape)
    assert await store.session_page(3, 0, shape) is first  # kept: the very same answer
    assert await store.session_page(3, 0, other_shape) == [s.id for s in first[0]]
    assert await store.session_page(2, 0, shape) == (first[0][:2], 5)
    later = await store.session_page(3, 3, shape)
    assert later == ((await fresh(store, 5))[0][3:], 5)
    assert await store.session_page(3, 3, shape) is not later  # other pages are read each time
    await store.rename_session(first[0][0].id, "renamed")
    assert (await store.session_page(3, 0, shape))[0][0].session_name == "renamed"


async def test_concurrent_writers_each_see_their_write_in_the_next_read(nursery, tmp_path):
    """Eight writers, each alone on its session, add messages while eight readers poll the page;
    after each write returns, the writer's next read shows exactly its count."""
    store = await open_store(nursery, tmp_path / "zenow.db")
    sessions = [(await store.create_session(f"s{i}")).id for i in range(8)]
    rng = random.Random(3)
    done = trio.Event()

    async def writer(sid: int) -> None:
        for written in range(1, 16):
            await store.add_message(sid, "user", f"message {written}", 2)
            page, _ = await store.session_page(100, 0, shape)
            mine = next(s for s in page if s.id == sid)
            assert (mine.message_count, mine.total_tokens) == (written, 2 * written)
            for _ in range(rng.randrange(3)):
                await trio.lowlevel.checkpoint()

    async def reader() -> None:
        while not done.is_set():
            await store.session_page(100, 0, shape)
            for _ in range(rng.randrange(3)):
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as readers:
        for _ in range(8):
            readers.start_soon(reader)
        async with trio.open_nursery() as writers:
            for sid in sessions:
                writers.start_soon(writer, sid)
        done.set()
    assert await store.session_page(100, 0, shape) == await fresh(store, 100)


async def test_a_write_whose_caller_stopped_waiting_is_still_visible(nursery, tmp_path):
    store = await open_store(nursery, tmp_path / "zenow.db")
    sid = (await store.create_session("s")).id
    assert (await store.session_page(10, 0, shape))[0][0].message_count == 0  # kept
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            inner.start_soon(store.add_message, sid, "user", "hello", 3)
            await trio.testing.wait_all_tasks_blocked()  # sent: the actor is writing in its thread
            scope.cancel()
    await store.get_session(sid)  # served after the write (the actor serves in order)
    page = await store.session_page(10, 0, shape)
    assert page == await fresh(store, 10)
    assert (page[0][0].message_count, page[0][0].total_tokens) == (1, 3)


def test_an_answer_read_before_a_write_settled_is_not_kept():
    cache = PageCache(capacity=2)
    generation = cache.generation
    cache.invalidate()  # a write settled while the answer was being read
    cache.keep("a", "stale", generation)
    assert cache.get("a") is None
    cache.keep("a", "fresh", cache.generation)
    cache.keep("b", "b", cache.generation)
    cache.keep("c", "c", cache.generation)  # past capacity: the oldest goes
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, "b", "c")


@pytest.fixture
async def fake(nursery, tmp_path):
    home = tmp_path / "home"
    write_stub_model(home / "models" / "llm" / "fake.gguf")
    from tests.support.llama import FAKE_LLAMA_SERVER

    async with start_zenow(nursery, make_settings(home, llama_server=str(FAKE_LLAMA_SERVER))) as zenow:
        assert (await zenow.client.post("/api/models/load", json={"model_name": "fake"})).status_code == 200
        yield zenow


async def test_every_api_write_is_in_the_next_session_list(fake):
    client = fake.client

    async def listed() -> dict:
        response = await client.get("/api/sessions")
        assert response.status_code == 200
        return response.json()

    async def row(sid: int) -> dict:
        return next(s for s in (await listed())["sessions"] if s["id"] == sid)

    first = (await create_session(client, "first"))["session_id"]
    assert [s["id"] for s in (await listed())["sessions"]] == [first]
    second = (await create_session(client, "second"))["session_id"]
    page = await listed()
    assert [s["id"] for s in page["sessions"]] == [second, first] and page["total"] == 2

    added = await add_message(client, first, "user", "hello")
    assert (await listed())["sessions"][0]["id"] == first  # moved to the top
    assert (await row(first))["message_count"] == 1
    assert (await row(first))["total_tokens"] == added["token_count"]

    assert (await client.put(f"/api/sessions/{first}/name", json={"new_name": "renamed"})).status_code == 200
    assert (await row(first))["session_name"] == "renamed"

    assert (await client.delete(f"/api/sessions/{first}/messages")).status_code == 200
    assert ((await row(first))["message_count"], (await row(first))["total_tokens"]) == (0, 0)

    # a chat: the chat streamer saves the question and the reply
    chat = {"session_id": second, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with client.stream("POST", "/api/chat", json=chat) as response:
        assert response.status_code == 200
        async for _ in response.aiter_lines():
            pass

    async def both_saved() -> list | None:
        messages = (await client.get(f"/api/sessions/{second}/messages")).json()["messages"]
        return messages if len(messages) == 2 else None

    messages = await wait_for(both_saved, timeout=10, what="the chat's messages to be saved")
    shown = await row(second)
    assert shown["message_count"] == 2
    assert shown["total_tokens"] == sum(m["token_count"] for m in messages)

    assert (await client.delete(f"/api/sessions/{second}")).status_code == 200
    page = await listed()
    assert [s["id"] for s in page["sessions"]] == [first] and page["total"] == 1


async def test_a_kept_page_answers_the_same_bytes_and_headers_as_a_fresh_one(client):
    for i in range(3):
        await create_session(client, f"s{i}")
    fresh_answer = await client.get("/api/sessions?limit=2")
    kept_answer = await client.get("/api/sessions?limit=2")
    assert kept_answer.content == fresh_answer.content
    assert kept_answer.headers["content-type"] == fresh_answer.headers["content-type"] == "application/json"
    assert kept_answer.content.endswith(b"}\n") and b'"sessions":[{"id":' in kept_answer.content
    other = await client.get("/api/sessions?limit=2&offset=1")
    assert other.json()["sessions"][0] == fresh_answer.json()["sessions"][1]


def test_every_query_that_changes_sessions_or_messages_goes_through_write():
    """The cache is only as true as this: a change made through `_run` would never invalidate it."""
    import inspect
    import re

    from zenow.store import _actor
    from zenow.store import _queries as q

    changes = re.compile(r"(INSERT INTO|UPDATE|DELETE FROM)\s+(sessions|messages)\b")
    source = inspect.getsource(_actor.Store)
    read_only = set(re.findall(r"self\._run\(\s*q\.(\w+)", source))
    written = set(re.findall(r"self\._write\(\s*q\.(\w+)", source))
    assert {"create_session", "rename_session", "delete_session", "add_message", "clear_messages"} <= written
    for name in read_only:
        assert not changes.search(inspect.getsource(getattr(q, name))), f"{name} changes sessions but runs via _run"


def list_queries_served() -> float:
    from zenow.metrics import REGISTRY

    return REGISTRY.get_sample_value("zenow_store_query_seconds_count", {"query": "list_sessions"}) or 0.0


async def test_readers_asking_at_once_share_one_read(nursery, tmp_path):
    store = await open_store(nursery, tmp_path / "zenow.db")
    for i in range(3):
        await store.create_session(f"s{i}")
    answers = []

    async def reader() -> None:
        answers.append(await store.session_page(10, 0, shape))

    before = list_queries_served()
    async with trio.open_nursery() as readers:
        for _ in range(20):
            readers.start_soon(reader)
    assert list_queries_served() - before == 1
    assert len(answers) == 20 and all(a is answers[0] for a in answers)
    assert answers[0] == await fresh(store, 10)


class Reads:
    """`read` functions for a PageCache whose answers the test releases one by one."""

    def __init__(self) -> None:
        self.asked = 0
        self.release: list[trio.Event] = []
        self.fail_next = False

    async def read(self) -> str:
        self.asked += 1
        number = self.asked
        released = trio.Event()
        self.release.append(released)
        await released.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the read failed")
        return f"answer {number}"


async def test_a_caller_does_not_wait_for_a_read_asked_before_a_write():
    cache, reads = PageCache(), Reads()
    got: dict[str, str] = {}

    async def ask(name: str) -> None:
        got[name] = await cache.answer("page", reads.read)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "before the write")
        await trio.testing.wait_all_tasks_blocked()
        cache.invalidate()  # a write settled while the first read is under way
        nursery.start_soon(ask, "after the write")
        await trio.testing.wait_all_tasks_blocked()
        assert reads.asked == 2  # its own read, not the first one's
        nursery.start_soon(ask, "joins the second")
        await trio.testing.wait_all_tasks_blocked()
        assert reads.asked == 2
        for released in reads.release:
            released.set()
    assert got == {"before the write": "answer 1", "after the write": "answer 2", "joins the second": "answer 2"}
    assert cache.get("page") == "answer 2"


async def test_callers_waiting_on_a_read_that_failed_or_was_cancelled_read_themselves():
    cache, reads = PageCache(), Reads()
    got: list[str] = []
    failures: list[Exception] = []

    async def ask() -> None:
        try:
            got.append(await cache.answer("page", reads.read))
        except RuntimeError as exc:
            failures.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):  # one reads, two wait for it
            nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert reads.asked == 1
        reads.fail_next = True
        reads.release[0].set()  # the read fails: its caller gets the error, one of the waiting reads
        await trio.testing.wait_all_tasks_blocked()
        assert (len(failures), reads.asked) == (1, 2)
        reads.release[1].set()
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["answer 2", "answer 2"]

        # a caller cancelled while reading: the one waiting for it reads itself
        cache.invalidate()
        leader = trio.CancelScope()

        async def cancellable() -> None:
            with leader:
                await ask()

        nursery.start_soon(cancellable)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        assert reads.asked == 3
        leader.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert reads.asked == 4
        reads.release[3].set()
    assert got == ["answer 2", "answer 2", "answer 4"]

"""Live events: the hub on its own, then `/api/events` (SSE) and `/api/ws` (WebSocket) over real sockets.

The WebSocket client is trio-websocket.  Server-status and download-progress events come
from the server and download actors, session and registry events from the store.
"""

from __future__ import annotations

import itertools
import json
import socket
import time

import h11
import httpx
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

import zenow.events
import zenow.routes.events
import zenow.service
from tests.support.events import subscribed
from tests.support.file_server import EMPTY_GGUF_HEADER, FileServer
from tests.support.harness import add_message, create_session, make_settings, start_zenow, wait_for
from zenow.errors import InvalidRequest
from zenow.events import (
    EVENT_TYPES,
    DownloadProgress,
    EventHub,
    MessageAdded,
    ModelRegistered,
    Overflow,
    ParametersChanged,
    ServerStatusEvent,
    SessionCreated,
    SessionDeleted,
    SessionRenamed,
    Snapshot,
    parse_types,
)
from zenow.store import MessageInfo, ModelInfo, SessionInfo

SESSION = SessionInfo(id=7, session_name="hello", created_at="2026-01-26T10:30:00",
                      updated_at="2026-01-26T10:30:00", message_count=0, total_tokens=0)


def progress(url: str, downloaded: int, status: str = "downloading", total: int = 1000) -> DownloadProgress:
    return DownloadProgress(url=url, filename="m.gguf", mode="llm", status=status, downloaded=downloaded,
                            total=total, progress=round(downloaded * 100 / total, 2))


def renamed(n: int) -> SessionRenamed:
    return SessionRenamed(session_id=n, session_name=f"name {n}")


# ---------------------------------------------------------------- the hub


async def test_every_event_is_an_object_with_type_and_a_float_timestamp():
    message = MessageInfo(id=1, session_id=7, role="user", content="你好", token_count=2,
                          created_at="2026-01-26T10:30:00")
    model = ModelInfo(id=3, name="m", path="/m.gguf", mode="llm", source_url=None, size=10, is_downloaded=True)
    events = [
        ServerStatusEvent(mode="llm", status="running", model_name="m", model_path="/m.gguf"),
        progress("http://x/m.gguf", 500),
        ModelRegistered(model=model),
        ParametersChanged(mode="llm", parameters={"temperature": 0.5}, requires_restart=False),
        SessionCreated(session=SESSION), renamed(7), SessionDeleted(session_id=7), MessageAdded(message=message),
        zenow.events.MessagesCleared(session_id=7), Snapshot(), Overflow(buffer=4),
    ]
    assert sorted({e.type for e in events} - {"snapshot", "overflow"}) == sorted(EVENT_TYPES)
    for event in events:
        decoded = json.loads(event.text)
        assert decoded["type"] == event.type
        assert isinstance(decoded["ts"], float) and abs(decoded["ts"] - time.time()) < 60
        assert event.sse == b"data: " + event.text.encode() + b"\n\n"
    assert json.loads(events[0].text) == {
        "type": "status", "ts": events[0].ts, "mode": "llm", "status": "running", "model_name": "m",
        "model_path": "/m.gguf", "is_running": True, "error_message": None}
    assert json.loads(events[7].text)["message"]["content"] == "你好"


async def test_a_subscriber_gets_the_types_it_asked_for_in_order():
    hub = EventHub()
    everything = hub.subscribe()
    sessions = hub.subscribe(parse_types("session"))
    renames = hub.subscribe(parse_types("session.renamed"))
    published = [SessionCreated(session=SESSION), ServerStatusEvent(mode="llm", status="starting"), renamed(1),
                 SessionDeleted(session_id=7), renamed(2)]
    for event in published:
        hub.publish(event)
    hub.close()
    assert [e async for e in everything] == published
    assert [e.type async for e in sessions] == ["session.created", "session.renamed", "session.deleted",
                                                "session.renamed"]
    assert [e async for e in renames] == [published[2], published[4]]


async def test_unknown_types_are_refused_naming_them():
    assert parse_types(None) is None and parse_types(" ") is None
    assert parse_types("status, download") == {"status", "download"}
    with pytest.raises(InvalidRequest, match="unknown event type 'sessions'") as refused:
        parse_types("status,sessions")
    assert refused.value.param == "types"


async def test_the_snapshot_comes_first_even_when_events_race_with_it():
    hub = EventHub()
    during = renamed(1)

    async def provider() -> Snapshot:
        hub.publish(during)  # happens while the snapshot is being taken
        await trio.lowlevel.checkpoint()
        return Snapshot(servers=(ServerStatusEvent(mode="llm", status="running"),),
                        downloads=(progress("http://x/a.gguf", 10),))

    hub.set_snapshot_provider(provider)
    subscription = await hub.open()
    first = await subscription.receive()
    assert isinstance(first, Snapshot) and first.servers[0].status == "running"
    assert await subscription.receive() is during

    only_sessions = await hub.open(parse_types("session"))
    snapshot = await only_sessions.receive()
    assert isinstance(snapshot, Snapshot) and snapshot.servers == () and snapshot.downloads == ()


async def test_a_failing_snapshot_provider_gives_an_empty_snapshot():
    hub = EventHub()

    async def provider() -> Snapshot:
        raise zenow.errors.ActorUnavailable("The download actor is not running")

    hub.set_snapshot_provider(provider)
    subscription = await hub.open()
    first = await subscription.receive()
    assert isinstance(first, Snapshot) and first.servers == () and first.downloads == ()
    hub.publish(renamed(1))
    assert (await subscription.receive()).type == "session.renamed"


async def test_a_full_buffer_drops_only_that_subscriber_with_one_overflow_event():
    hub = EventHub(buffer=4)
    stalled = hub.subscribe()
    reader = hub.subscribe()
    received = []
    for n in range(10):
        hub.publish(renamed(n))
        received.append(await reader.receive())  # keeps up
    assert [e.session_id for e in received] == list(range(10))
    assert hub.subscribers == 1 and hub.dropped == 1
    assert stalled.overflowed and not reader.overflowed
    last = [e async for e in stalled]
    assert len(last) == 1 and isinstance(last[0], Overflow) and last[0].buffer == 4
    assert json.loads(last[0].text)["detail"].startswith("this subscriber fell more than 4 events behind")


async def test_a_thousand_idle_subscribers_are_cheap_to_publish_to():
    hub = EventHub()
    subscriptions = [hub.subscribe() for _ in range(1000)]
    started = time.perf_counter()
    for n in range(100):
        hub.publish(renamed(n))
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"100 events to 1000 subscribers took {elapsed:.2f} s"
    assert hub.dropped == 0 and all(len(s._queue) == 100 for s in subscriptions)


async def test_progress_is_paced_to_four_a_second_and_the_final_state_always_goes():
    now = [0.0]
    hub = EventHub(clock=lambda: now[0])
    subscription = hub.subscribe()
    for step in range(101):  # 10 ms apart, 1 byte per ms: 1000 bytes/s
        now[0] = step / 100
        hub.publish(progress("http://x/a.gguf", step * 10))
    hub.publish(progress("http://x/a.gguf", 1000, status="completed"))
    hub.publish(progress("http://x/b.gguf", 0))  # another download is paced on its own
    hub.close()
    seen = [e async for e in subscription]
    a = [e for e in seen if isinstance(e, DownloadProgress) and e.url.endswith("a.gguf")]
    assert [e.downloaded for e in a] == [0, 250, 500, 750, 1000, 1000]
    assert a[0].speed is None and all(e.speed == pytest.approx(1000) for e in a[1:])
    assert a[-1].status == "completed" and a[-1].eta is None
    assert json.loads(a[2].text)["eta"] == 0.5
    assert [e.downloaded for e in seen if isinstance(e, DownloadProgress) and e.url.endswith("b.gguf")] == [0]


async def test_the_newest_held_back_progress_goes_once_its_interval_has_passed(autojump_clock):
    # A download that stalls right after a burst: the last progress of the burst was held back
    # by the pacing; it must still reach subscribers, once, and after a newer one nothing is resent.
    hub = EventHub(progress_interval=0.2, clock=trio.current_time)
    subscription = hub.subscribe()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.release_held_progress)
        hub.publish(progress("http://x/a.gguf", 0))
        hub.publish(progress("http://x/a.gguf", 10))
        hub.publish(progress("http://x/a.gguf", 20))  # held back: the stall's last figure
        assert [e.downloaded for e in drain(subscription)] == [0]
        await trio.sleep(0.1)
        assert drain(subscription) == []
        await trio.sleep(0.15)
        assert [e.downloaded for e in drain(subscription)] == [20]
        hub.publish(progress("http://x/a.gguf", 30))  # held, then overtaken by the final state
        hub.publish(progress("http://x/a.gguf", 40, status="completed"))
        await trio.sleep(0.5)
        assert [(e.downloaded, e.status) for e in drain(subscription)] == [(40, "completed")]
        nursery.cancel_scope.cancel()


def drain(subscription):
    events = list(subscription._queue)
    subscription._queue.clear()
    return events


async def test_closing_the_hub_ends_subscriptions_after_what_they_had_queued():
    hub = EventHub()
    subscription = hub.subscribe()
    hub.publish(renamed(1))
    hub.close()
    hub.publish(renamed(2))
    assert [e.session_id async for e in subscription] == [1]
    late = hub.subscribe()
    with pytest.raises(trio.EndOfChannel):
        await late.receive()


async def test_a_waiting_receiver_wakes_for_the_next_event_and_can_be_cancelled():
    hub = EventHub()
    subscription = hub.subscribe()
    with trio.move_on_after(0.05) as waited:
        await subscription.receive()
    assert waited.cancelled_caught
    async with trio.open_nursery() as nursery:
        got: list[object] = []

        async def receive() -> None:
            got.append(await subscription.receive())

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        hub.publish(renamed(3))
    assert got == [SessionRenamed(session_id=3, session_name="name 3", ts=got[0].ts)]  # type: ignore[attr-defined]
    subscription.close()
    assert hub.subscribers == 0


# ---------------------------------------------------------------- over HTTP


def ws_url(zenow, query: str = "") -> str:
    return zenow.url.replace("http://", "ws://") + "/api/ws" + query


@pytest.fixture
def hubs(monkeypatch) -> list[EventHub]:
    """Every EventHub a zenow started from now on makes (to look at its subscribers)."""
    made: list[EventHub] = []

    class RecordingHub(EventHub):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            made.append(self)

    monkeypatch.setattr(zenow.service, "EventHub", RecordingHub)
    return made


async def test_sse_starts_with_the_snapshot_of_every_mode(client):
    async with subscribed(client) as (_, snapshot):
        assert snapshot["type"] == "snapshot" and isinstance(snapshot["ts"], float)
        idle = {"status": "not_started", "model_name": None, "model_path": None, "is_running": False,
                "error_message": None}
        assert snapshot["servers"] == {"llm": idle, "embed": idle, "rerank": idle}
        assert snapshot["downloads"] == []


async def test_session_changes_from_another_client_reach_a_subscriber(zenow):
    async with subscribed(zenow.client) as (events, _), httpx.AsyncClient(base_url=zenow.url) as other:
        sid = (await create_session(other, "first words"))["session_id"]
        created = await events.next()
        assert created["type"] == "session.created"
        assert created["session"]["id"] == sid and created["session"]["session_name"] == "first words"
        assert created["session"]["message_count"] == 0

        await other.put(f"/api/sessions/{sid}/name", json={"new_name": "新名字"})
        assert await events.next() == {"type": "session.renamed", "ts": pytest.approx(time.time(), abs=30),
                                       "session_id": sid, "session_name": "新名字"}
        added = await add_message(other, sid, "user", "hello there")
        message = await events.next()
        assert message["type"] == "session.message" and message["session_id"] == sid
        assert message["message"] == {"id": added["message_id"], "session_id": sid, "role": "user",
                                      "content": "hello there", "token_count": added["token_count"],
                                      "created_at": message["message"]["created_at"]}
        await other.delete(f"/api/sessions/{sid}/messages")
        assert (await events.next())["type"] == "session.cleared"
        await other.delete(f"/api/sessions/{sid}")
        deleted = await events.next()
        assert (deleted["type"], deleted["session_id"]) == ("session.deleted", sid)
        # a failed change announces nothing: the next event is the next real change
        assert (await other.delete(f"/api/sessions/{sid}")).status_code == 404
        await create_session(other, "again")
        assert (await events.next())["type"] == "session.created"


async def test_a_websocket_subscriber_gets_the_snapshot_then_live_events(zenow):
    async with open_websocket_url(ws_url(zenow)) as ws:
        snapshot = json.loads(await ws.get_message())
        assert snapshot["type"] == "snapshot" and set(snapshot["servers"]) == {"llm", "embed", "rerank"}
        await ws.send_message("anything the client sends is ignored")
        sid = (await create_session(zenow.client, "over the socket"))["session_id"]
        event = json.loads(await ws.get_message())
        assert (event["type"], event["session"]["id"]) == ("session.created", sid)


async def test_types_filter_what_a_subscriber_receives(zenow):
    client = zenow.client
    async with subscribed(client, types="session.renamed") as (renames, snapshot), \
            open_websocket_url(ws_url(zenow, "?types=status,download")) as ws:
        assert snapshot["servers"] == {} and snapshot["downloads"] == []
        ws_snapshot = json.loads(await ws.get_message())
        assert set(ws_snapshot["servers"]) == {"llm", "embed", "rerank"}
        sid = (await create_session(client))["session_id"]
        await client.put(f"/api/sessions/{sid}/name", json={"new_name": "renamed"})
        first = await renames.next()
        assert (first["type"], first["session_name"]) == ("session.renamed", "renamed")
        with trio.move_on_after(0.3):  # session events never reach a status,download subscriber
            pytest.fail(f"unexpected event: {await ws.get_message()}")


async def test_an_unknown_type_is_refused_on_both_routes(zenow):
    response = await zenow.client.get("/api/events", params={"types": "status,bogus"})
    assert response.status_code == 400
    assert response.json()["detail"].startswith("types: unknown event type 'bogus'")
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(ws_url(zenow, "?types=bogus")):
            pass
    assert rejected.value.status_code == 400
    assert json.loads(rejected.value.body)["detail"].startswith("types: unknown event type 'bogus'")


async def test_the_event_routes_take_the_api_key_in_the_query(nursery, tmp_path):
    settings = make_settings(tmp_path / "home", api_keys=("s3cret",))
    async with start_zenow(nursery, settings) as zenow:
        refused = await zenow.client.get("/api/events")
        assert refused.status_code == 401
        async with subscribed(zenow.client, api_key="s3cret") as (_, snapshot):
            assert snapshot["type"] == "snapshot"
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_websocket_url(ws_url(zenow)):
                pass
        assert rejected.value.status_code == 401
        with pytest.raises(ConnectionRejected):
            async with open_websocket_url(ws_url(zenow, "?api_key=wrong")):
                pass
        async with open_websocket_url(ws_url(zenow, "?api_key=s3cret")) as ws:
            assert json.loads(await ws.get_message())["type"] == "snapshot"
        async with open_websocket_url(ws_url(zenow), extra_headers=[("Authorization", "Bearer s3cret")]) as ws:
            assert json.loads(await ws.get_message())["type"] == "snapshot"
        # the query is no way in elsewhere
        assert (await zenow.client.get("/api/sessions", params={"api_key": "s3cret"})).status_code == 401


async def test_the_websocket_refuses_foreign_hosts_and_origins(zenow):
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    foreign_host = await zenow.client.get("/api/ws", headers={**upgrade, "Host": "evil.example"})
    assert foreign_host.status_code == 403
    assert foreign_host.json()["detail"].startswith("Host 'evil.example' is not allowed")
    with pytest.raises(ConnectionRejected) as rejected:
        async with open_websocket_url(ws_url(zenow), extra_headers=[("Origin", "https://evil.example")]):
            pass
    assert rejected.value.status_code == 403
    async with open_websocket_url(ws_url(zenow), extra_headers=[("Origin", "http://localhost:5173")]) as ws:
        assert json.loads(await ws.get_message())["type"] == "snapshot"


async def test_a_quiet_stream_sends_ping_comments(client, monkeypatch):
    monkeypatch.setattr(zenow.routes.events, "PING_INTERVAL", 0.2)
    async with subscribed(client) as (events, _):
        sid = (await create_session(client))["session_id"]
        assert (await events.next())["session"]["id"] == sid
        with trio.move_on_after(0.7):
            await events.next()
        assert events.comments[:2] == [": ping", ": ping"]


async def test_a_client_going_away_ends_its_subscription(hubs, zenow):
    (hub,) = hubs
    async with subscribed(zenow.client), open_websocket_url(ws_url(zenow)) as ws:
        await ws.get_message()
        assert hub.subscribers == 2
    await wait_for(lambda: _is(hub.subscribers == 0), timeout=5, what="both subscriptions to end")


async def _is(value: bool) -> bool:
    return value


async def test_shutdown_ends_every_stream_at_once(hubs, nursery, tmp_path):
    settings = make_settings(tmp_path / "home", graceful_timeout=5.0)
    async with start_zenow(nursery, settings) as running, subscribed(running.client) as (events, _), \
            open_websocket_url(ws_url(running)) as ws:
        await ws.get_message()
        started = trio.current_time()
        running.shutdown.set()
        assert await events.rest() == []  # the body ended cleanly: no cut-off chunk
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1001
        assert trio.current_time() - started < 2.0  # not the graceful timeout


async def test_a_completed_download_announces_its_model(zenow, nursery):
    files = FileServer()
    await files.start(nursery)
    data = EMPTY_GGUF_HEADER + bytes(200 * 1024)
    files.add("/m/Tiny-Q4_0.gguf", data)
    async with subscribed(zenow.client, types="model") as (events, _):
        response = await zenow.client.post("/api/models/download", json={"url": files.url("/m/Tiny-Q4_0.gguf"),
                                                                            "mode": "embed"})
        assert response.status_code == 200, response.text
        registered = await events.next()
    assert registered["type"] == "model.registered"
    model = registered["model"]
    assert (model["name"], model["mode"], model["size"], model["is_downloaded"]) == (
        "Tiny-Q4_0", "embed", len(data), True)
    assert model["path"] == str(zenow.settings.mode_dir("embed") / "Tiny-Q4_0.gguf")


async def test_download_progress_comes_in_order_and_ends_in_completed(zenow, nursery):
    files = FileServer()
    await files.start(nursery)
    data = EMPTY_GGUF_HEADER + bytes(2 * 1024 * 1024)
    files.add("/slow.gguf", data, trickle=0.02, chunk_size=32 * 1024)  # about 1.3 s
    url = files.url("/slow.gguf")
    async with subscribed(zenow.client, types="download") as (events, _):
        await zenow.client.post("/api/models/download", json={"url": url})
        seen = []
        while not seen or seen[-1]["status"] == "downloading":
            seen.append(await events.next(timeout=10))
    assert all(e["type"] == "download" and e["url"] == url and e["filename"] == "slow.gguf" for e in seen)
    assert len(seen) >= 3
    assert [e["downloaded"] for e in seen] == sorted(e["downloaded"] for e in seen)
    assert seen[-1]["status"] == "completed" and seen[-1]["progress"] == 100.0
    assert seen[-1]["downloaded"] == seen[-1]["total"] == len(data)
    gaps = [b["ts"] - a["ts"] for a, b in itertools.pairwise(seen[:-1])]
    assert all(gap >= 0.2 for gap in gaps), gaps  # 4 a second at most
    assert any(e["speed"] for e in seen[1:])


async def test_a_running_download_is_in_the_snapshot(zenow, nursery):
    files = FileServer()
    await files.start(nursery)
    served = files.add("/held.gguf", EMPTY_GGUF_HEADER + bytes(300 * 1024), holds=[100 * 1024])
    url = files.url("/held.gguf")
    await zenow.client.post("/api/models/download", json={"url": url, "mode": "rerank"})
    try:
        async with subscribed(zenow.client) as (_, snapshot):
            (download,) = snapshot["downloads"]
            assert (download["url"], download["filename"], download["mode"], download["status"]) == (
                url, "held.gguf", "rerank", "downloading")
            assert set(download) == {"url", "filename", "mode", "status", "downloaded", "total", "progress",
                                     "speed", "eta", "error"}
        async with subscribed(zenow.client, types="session") as (_, snapshot):
            assert snapshot["downloads"] == []  # not asked for
    finally:
        served.release.set()


async def test_a_parameter_change_is_announced(zenow):
    async with subscribed(zenow.client, types="parameters") as (events, _):
        response = await zenow.client.post("/api/models/update_param", params={"mode": "embed"},
                                           json={"batch_size": 256})
        assert response.status_code == 200, response.text
        event = await events.next(timeout=5)
    assert (event["type"], event["mode"], event["requires_restart"]) == ("parameters", "embed", True)
    assert event["parameters"]["batch_size"] == 256
    assert event["parameters"] == (await zenow.client.get("/api/models/get_param", params={"mode": "embed"})).json()


# ---------------------------------------------------------------- a subscriber that stops reading


def _stalled_subscriber(port: int) -> socket.socket:
    """A connection that asks for the events and then never reads (its receive buffer kept tiny)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Read the whole (chunked) response; returns the status and the body.  Blocking."""
    connection = h11.Connection(h11.CLIENT)
    connection.send(h11.Request(method="GET", target="/api/events", headers=[("Host", "127.0.0.1")]))
    sock.settimeout(20)
    status, body = 0, bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(sock.recv(1 << 16))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(body)


async def test_a_stalled_subscriber_is_dropped_while_a_reading_one_gets_everything(hubs, nursery, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(zenow.events, "SUBSCRIBER_BUFFER", 8)
    async with start_zenow(nursery, make_settings(tmp_path / "home")) as running:
        (hub,) = hubs
        client = running.client
        sid = (await create_session(client))["session_id"]
        port = int(running.url.rsplit(":", 1)[1])
        stalled = await trio.to_thread.run_sync(_stalled_subscriber, port)
        try:
            await wait_for(lambda: _is(hub.subscribers == 1), timeout=5, what="the stalled subscriber")
            async with subscribed(client, types="session") as (reader, _):
                big = "x" * (256 * 1024)
                sent = 0
                while hub.dropped == 0:  # until the stalled one's socket and buffer are full
                    assert sent < 200, "the stalled subscriber was never dropped"
                    await add_message(client, sid, "user", big)
                    sent += 1
                    assert (await reader.next())["message"]["content"] == big
                assert hub.subscribers == 1  # only the reading one is left
                for _ in range(3):  # and it goes on receiving
                    await add_message(client, sid, "user", "after the drop")
                    assert (await reader.next())["message"]["content"] == "after the drop"
                    sent += 1
            status, body = await trio.to_thread.run_sync(_read_response, stalled)
        finally:
            stalled.close()
    assert status == 200
    frames = [json.loads(f[len("data: "):]) for f in body.decode().split("\n\n") if f.startswith("data: ")]
    assert frames[0]["type"] == "snapshot"
    assert frames[-1]["type"] == "overflow" and frames[-1]["buffer"] == 8
    got = [f for f in frames if f["type"] == "session.message"]
    assert len(got) < sent, (len(got), sent)  # it missed what came after it fell behind
    assert sent > 8, sent


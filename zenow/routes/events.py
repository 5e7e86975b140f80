"""Live events: `GET /api/events` (Server-Sent Events) and `/api/ws` (WebSocket).

Both stream the event hub (`zenow.events`): first one `snapshot` (every mode's server
status, the downloads in progress), then each event as it happens, every one a JSON
object with `type` and `ts`.  `?types=status,download` keeps only those types (a
category such as `session` takes all of `session.*`); an unknown type answers 400.
A client is subscribed once it has received the snapshot.

SSE: one `data: {...}` frame per event, and a `: ping` comment after
`PING_INTERVAL` seconds without one, so proxies keep the connection open.  WebSocket:
one text message per event; what the client sends is read and ignored.

A subscriber that falls `SUBSCRIBER_BUFFER` events behind (a client that stopped
reading) gets an `overflow` event as its last and the stream ends: SSE ends its body,
the WebSocket closes with 1013 (try again later).  Publishers never wait for it.
At shutdown every stream ends at once (the WebSocket closes with 1001).

The WebSocket is served by hypercorn's own WebSocket support through quart-trio
(`Blueprint.websocket`), not by trio-websocket: it then shares zenow's one port,
listener, connection cap and graceful shutdown, and a browser page reaches it at the
same origin as the rest of the API.  trio-websocket is a server and client of its
own, which would need a second listening socket; it is what the tests use as the
client.

API keys: both routes also take the key as `?api_key=KEY` (an EventSource or a
browser WebSocket cannot send headers).  Quart runs the app's `before_request` checks
for HTTP only, so `/api/ws` makes the same checks itself (`before_websocket`): the
Host header, the key, and the Origin, since browsers apply no CORS to WebSockets and
any web site could otherwise open one to this machine.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import trio
from quart import Blueprint, Response, request, websocket
from quart_schema import hide

from ..errors import InvalidRequest
from ..events import parse_types
from ._context import services
from ._sse import sse_response

__all__ = ["PING", "PING_INTERVAL", "bp"]

bp = Blueprint("events", __name__)

#: Seconds without an event after which an SSE stream sends a `: ping` comment.
PING_INTERVAL = 15.0
PING = b": ping\n\n"

#: WebSocket close codes: zenow is stopping; the subscriber fell behind (reconnect later).
GOING_AWAY = 1001
TRY_AGAIN_LATER = 1013


@bp.get("/api/events")
@hide  # an endless stream: nothing a schema fuzzer can call
async def event_stream() -> Response:
    """The events as Server-Sent Events (see the module docstring)."""
    types = parse_types(request.args.get("types"))
    hub = services().events

    async def frames() -> AsyncIterator[bytes]:
        # Subscribed here, when the body is first read: a client gone before that leaves nothing behind.
        with await hub.open(types) as subscription:
            while True:
                frame = PING
                with trio.move_on_after(PING_INTERVAL):
                    try:
                        frame = (await subscription.receive()).sse
                    except trio.EndOfChannel:
                        return
                yield frame

    return sse_response(frames(), lambda: None)  # the subscription closes with its `with`


def _refused(status: int, detail: str) -> Response:
    return Response(json.dumps({"detail": detail}), status=status, content_type="application/json")


@bp.before_websocket
async def check_websocket() -> Response | None:
    """The checks the app makes on HTTP requests (Host, API key), plus the Origin."""
    # Imported here: zenow.app imports the routes.
    from ..app import host_allowed, is_loopback, key_accepted, origin_allowed, presented_key

    settings = services().settings
    headers = dict(websocket.headers.items())
    host = headers.get("Host", "")
    if is_loopback(settings.host) and not host_allowed(host, frozenset(h.lower() for h in settings.allowed_hosts)):
        return _refused(403, f"Host {host!r} is not allowed: zenow answers localhost, 127.0.0.1 and [::1] "
                             "(add names with --allowed-host)")
    origin = headers.get("Origin")
    if origin is not None and not origin_allowed(origin, settings.cors_origins):
        return _refused(403, f"Origin {origin} is not allowed")
    if settings.api_keys and not key_accepted(presented_key(headers, websocket.path, websocket.args),
                                              settings.api_keys):
        return _refused(401, "Missing or wrong API key: send 'Authorization: Bearer <key>', 'x-api-key: <key>' "
                             "or ?api_key=<key>")
    return None


@bp.websocket("/api/ws")
async def event_socket() -> Response | None:
    """The events as WebSocket text messages (see the module docstring)."""
    try:
        types = parse_types(websocket.args.get("types"))
    except InvalidRequest as exc:
        return _refused(400, exc.detail)
    hub = services().events
    await websocket.accept()
    with await hub.open(types) as subscription:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_ignore_incoming)
            async for event in subscription:
                await websocket.send(event.text)
            nursery.cancel_scope.cancel()
    if subscription.overflowed:
        await websocket.close(TRY_AGAIN_LATER, "fell behind: reconnect for a fresh snapshot")
    else:
        await websocket.close(GOING_AWAY, "zenow is stopping")
    return None


async def _ignore_incoming() -> None:
    """Read what the client sends, so its messages never pile up unread."""
    while True:
        await websocket.receive()

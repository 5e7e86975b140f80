"""The benchmarks' baseline: a bare hypercorn + quart-trio app, with the shapes of zenow's answers
but no work behind them (no actor, no database, no upstream).

    python bench/_bare.py [--sessions-json FILE] [--port PORT] [--upstream URL]
    python bench/_bare.py --relay-to URL [--port PORT]

Prints `bare app serving on http://127.0.0.1:PORT` on stderr once it listens.  Routes:
`GET /api/health`; `GET /api/sessions` (the JSON in FILE, else an empty page);
`POST /api/sessions/<id>/messages` (answers a message echoing the body);
`POST /api/chat?n=N` (an SSE answer of N events shaped like zenow's deltas, then
`data: [DONE]`; one event per write, as fast as the client reads);
with `--upstream URL`, `POST /v1/chat/completions` passes the request to URL's and streams its answer back
chunk by chunk with httpx: the same stack as zenow (hypercorn, quart-trio, httpx) with none of its work.

`--relay-to URL` serves no HTTP at all: each connection is relayed byte for byte to URL's host and port
by two trio tasks (trio's floor, with no HTTP parsing).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

FRAME = b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def build(sessions_body: bytes, upstream: str | None = None) -> QuartTrio:
    app = QuartTrio("bare")

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"status": "healthy", "app": "bare"}

    @app.get("/api/sessions")
    async def sessions() -> Response:
        return Response(sessions_body, content_type="application/json")

    @app.post("/api/sessions/<int:sid>/messages")
    async def add_message(sid: int) -> dict[str, Any]:
        body = await request.get_json()
        return {"id": 1, "session_id": sid, "role": body["role"], "content": body["content"], "token_count": 1,
                "created_at": "2026-01-01T00:00:00"}

    @app.post("/api/chat")
    async def chat() -> Response:
        await request.get_data()
        count = int(request.args.get("n", "100"))

        async def frames() -> AsyncIterator[bytes]:
            for _ in range(count):
                yield FRAME
            yield DONE

        response = Response(frames(), status=200, headers={"Content-Type": "text/event-stream",
                                                            "Cache-Control": "no-cache"})
        response.timeout = None
        return response

    if upstream is not None:
        http = httpx.AsyncClient(base_url=upstream, timeout=None, trust_env=False)

        @app.post("/v1/chat/completions")
        async def proxy() -> Response:
            body = await request.get_data()
            answer = await http.send(http.build_request("POST", "/v1/chat/completions", content=body,
                                                        headers={"Content-Type": "application/json"}), stream=True)

            async def chunks() -> AsyncIterator[bytes]:
                try:
                    async for chunk in answer.aiter_raw():
                        yield chunk
                finally:
                    await answer.aclose()

            response = Response(chunks(), status=answer.status_code,
                                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            response.timeout = None
            return response

    return app


async def relay(port: int, target: str) -> None:
    """Byte-for-byte TCP relay to `target` (http://HOST:PORT), two trio tasks per connection."""
    host, _, target_port = target.removeprefix("http://").rstrip("/").rpartition(":")

    async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def connection(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream(host, int(target_port)) as server, \
                trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, server)
            nursery.start_soon(pump, server, client)

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print(f"bare app serving on http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", file=sys.stderr, flush=True)
    await trio.serve_listeners(connection, listeners)


async def main(args: argparse.Namespace, body: bytes) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.keep_alive_timeout = 30
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, build(body, args.upstream), config)
        print(f"bare app serving on {binds[0]}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions-json", default=None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", default=None, help="serve /v1/chat/completions by streaming from this URL")
    parser.add_argument("--relay-to", default=None, help="relay TCP to this URL's host and port instead")
    arguments = parser.parse_args()
    if arguments.relay_to:
        trio.run(relay, arguments.port, arguments.relay_to)
        sys.exit()
    sessions = Path(arguments.sessions_json).read_bytes() if arguments.sessions_json else b'{"sessions":[],"total":0}'
    trio.run(main, arguments, sessions)

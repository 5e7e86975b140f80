"""The benchmarks' baseline: a bare hypercorn + quart-trio app, with the shapes of zenow's answers
but no work behind them (no actor, no database, no upstream).

    python bench/_bare.py [--sessions-json FILE] [--port PORT]

Prints `bare app serving on http://127.0.0.1:PORT` on stderr once it listens.  Routes:
`GET /api/health`; `GET /api/sessions` (the JSON in FILE, else an empty page);
`POST /api/sessions/<id>/messages` (answers a message echoing the body);
`POST /api/chat?n=N` (an SSE answer of N events shaped like zenow's deltas, then
`data: [DONE]`; one event per write, as fast as the client reads).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

FRAME = b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def build(sessions_body: bytes) -> QuartTrio:
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

    return app


async def main(args: argparse.Namespace, body: bytes) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{args.port}"]
    config.accesslog = None
    config.keep_alive_timeout = 30
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, build(body), config)
        print(f"bare app serving on {binds[0]}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions-json", default=None)
    parser.add_argument("--port", type=int, default=0)
    arguments = parser.parse_args()
    sessions = Path(arguments.sessions_json).read_bytes() if arguments.sessions_json else b'{"sessions":[],"total":0}'
    trio.run(main, arguments, sessions)

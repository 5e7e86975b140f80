"""A raw HTTP/1.1 answer on a trio stream, for servers that misbehave on purpose or pace their bytes."""

from __future__ import annotations

import re

import trio

_LENGTH = re.compile(rb"(?im)^content-length: *(\d+)\r?$")
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


async def read_request(stream: trio.abc.Stream) -> bytes:
    """Read one whole request, head and body: a server that closes with part of a request unread
    resets the connection, and the client then sees the reset instead of what was sent to it."""
    request = b""
    while b"\r\n\r\n" not in request:
        request += await stream.receive_some(65536)
    head, _, body = request.partition(b"\r\n\r\n")
    match = _LENGTH.search(head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body

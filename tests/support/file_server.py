"""A real HTTP/1.1 file server for download tests, on 127.0.0.1, in-process under trio.

Raw trio sockets, one request per connection, so a test can make it misbehave the way
real servers and links do: serve ranges (206 + Content-Range) or ignore them (200, the
whole file), drop the connection after N body bytes, hold a response until the test
releases it, trickle slowly, answer an error status, announce a wrong length or type,
send the body in chunks (`Transfer-Encoding: chunked`) or extra headers (any bytes),
redirect anywhere, or answer bytes that are no HTTP at all.  It counts the body bytes
it sent, per file, so a test can tell "fetched once" from "twice", and keeps each
request's target and Authorization header.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from functools import partial

import trio

__all__ = ["EMPTY_GGUF_HEADER", "FileServer", "ServedFile", "SeenRequest"]

#: The smallest valid GGUF header (version 3, no tensors, no metadata): a downloaded file must
#: start with a header zenow can read, so test files are this and then any bytes.
EMPTY_GGUF_HEADER = b"GGUF" + struct.pack("<IQQ", 3, 0, 0)

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
_METHOD = re.compile(rb"^[A-Z]{1,7}( |$)")
_REASONS = {200: "OK", 206: "Partial Content", 301: "Moved Permanently", 302: "Found", 307: "Temporary Redirect",
            404: "Not Found", 416: "Range Not Satisfiable", 500: "Internal Server Error",
            503: "Service Unavailable"}


@dataclass(frozen=True)
class SeenRequest:
    path: str
    range: str | None
    status: int
    #: The request line's target as sent (path and query) and the Authorization header.
    target: str | None = field(default=None, compare=False)
    authorization: str | None = field(default=None, compare=False)


@dataclass(eq=False)
class ServedFile:
    """A file and how to misbehave when serving it (change the fields between phases of a test)."""

    data: bytes
    #: Answer `Range` requests with 206; False: ignore them and send the whole file with 200.
    ranges: bool = True
    #: One entry per request, in order: close the connection after that many body bytes.
    drops: list[int] = field(default_factory=list)
    #: One entry per request, in order: stop after that many body bytes until `release` is set.
    holds: list[int] = field(default_factory=list)
    release: trio.Event = field(default_factory=trio.Event)
    #: Seconds to wait between body chunks.
    trickle: float = 0.0
    chunk_size: int = 16 * 1024
    #: Answer with this status (and a short text body) instead of the file.
    status: int = 200
    #: Announce this Content-Length instead of the real one.
    announce_length: int | None = None
    #: False: send no Content-Length; the body ends when the connection closes.
    send_length: bool = True
    #: Send the body with `Transfer-Encoding: chunked` (one HTTP chunk per `chunk_size`; no Content-Length).
    chunked: bool = False
    #: More headers; each character of a value is sent as the byte of its code point (latin-1).
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/octet-stream"
    #: Redirect here (with `status`, 302 unless set otherwise) instead of serving the file.
    location: str | None = None
    #: Answer these bytes, whatever they are, instead of an HTTP response.
    raw_answer: bytes | None = None
    #: Body bytes sent, all requests together.
    sent: int = 0
    requests: list[SeenRequest] = field(default_factory=list)

    @property
    def ranges_asked(self) -> list[str | None]:
        return [r.range for r in self.requests]


class FileServer:
    """Serves `ServedFile`s by path; unknown paths answer 404."""

    def __init__(self) -> None:
        self.files: dict[str, ServedFile] = {}
        self.port = 0

    def add(self, path: str, data: bytes, **behaviour: object) -> ServedFile:
        served = ServedFile(data, **behaviour)  # type: ignore[arg-type]
        self.files[path] = served
        return served

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            head = await _read_head(stream)
            if head is None:
                return
            method, target, headers = head
            path = target.split("?", 1)[0]
            served = self.files.get(path)
            if served is None:
                await _send_text(stream, 404, "no such file")
                return
            await self._serve(stream, served, path, target, headers, head_only=method == "HEAD")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, served: ServedFile, path: str, target: str,
                     headers: dict[str, str], head_only: bool) -> None:
        range_header = headers.get("range")
        seen = partial(SeenRequest, path, range_header, target=target, authorization=headers.get("authorization"))
        drop = served.drops.pop(0) if served.drops else None
        hold = served.holds.pop(0) if served.holds else None
        if served.raw_answer is not None:
            served.requests.append(seen(0))
            await stream.send_all(served.raw_answer)
            return
        if served.location is not None:
            status = 302 if served.status == 200 else served.status
            served.requests.append(seen(status))
            await _send(stream, status, {"Location": served.location, "Content-Length": "0"})
            return
        if served.status != 200:
            served.requests.append(seen(served.status))
            await _send_text(stream, served.status, "nope")
            return
        size = len(served.data)
        start, status, extra = 0, 200, {}
        match = _RANGE.match(range_header or "")
        if served.ranges and match:
            start = int(match.group(1))
            if start >= size:
                served.requests.append(seen(416))
                await _send(stream, 416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
                return
            status, extra = 206, {"Content-Range": f"bytes {start}-{size - 1}/{size}"}
        body = served.data[start:]
        length = served.announce_length if served.announce_length is not None else len(body)
        served.requests.append(seen(status))
        if served.chunked:
            extra["Transfer-Encoding"] = "chunked"
        elif served.send_length:
            extra["Content-Length"] = str(length)
        await _send(stream, status, {**extra, "Accept-Ranges": "bytes", "Content-Type": served.content_type,
                                     **served.headers})
        if head_only:
            return
        position = 0
        while position < len(body):
            limit = len(body)
            if drop is not None:
                limit = min(limit, drop)
            if hold is not None and position >= hold:
                await served.release.wait()
                hold = None
            elif hold is not None:
                limit = min(limit, hold)
            if position >= limit:
                return  # the drop: close without sending the rest
            chunk = body[position:min(limit, position + served.chunk_size)]
            await stream.send_all(b"%x\r\n%s\r\n" % (len(chunk), chunk) if served.chunked else chunk)
            position += len(chunk)
            served.sent += len(chunk)
            if served.trickle:
                await trio.sleep(served.trickle)
        if served.chunked:
            await stream.send_all(b"0\r\n\r\n")


async def _read_head(stream: trio.SocketStream) -> tuple[str, str, dict[str, str]] | None:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data or len(buffer) > 65536:
            return None
        buffer += data
        if not _METHOD.match(buffer[:8]):
            # not HTTP (say, a TLS handshake sent to this plain port): answer like any HTTP server
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            return None
    lines = buffer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


async def _send(stream: trio.SocketStream, status: int, headers: dict[str, str]) -> None:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


async def _send_text(stream: trio.SocketStream, status: int, text: str) -> None:
    body = text.encode()
    await _send(stream, status, {"Content-Length": str(len(body)), "Content-Type": "text/plain"})
    await stream.send_all(body)

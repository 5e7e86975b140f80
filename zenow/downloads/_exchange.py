"""One attempt of a download, blocking, for a worker thread: the GET (redirects followed by
hand), its answer, and its body written to the `.part`.  Trio-free.

The event loop never reads the body: at a GiB a second, every read of it handed to trio
cost the loop more than the copy itself.  A worker thread asks the stdlib's `http.client`
(a blocking socket, certificates verified, no proxy, the environment not read) for the
answer, reads the body into one reused buffer with `readinto1` (whatever the kernel holds,
up to `read_bytes`) and writes it to the `.part` itself.  The thread only adds to
counters (`Exchange.received`); the actor's task reads them to announce progress.

`Exchange.abort`, called from any thread, shuts the socket down: a read blocked on a
stalled server returns at once, the thread writes what it holds and returns, so the
`.part` keeps every byte received (never a hole, never half a write).

Errors: `Failure` ends the download, `Dropped` asks for a retry; both carry texts made
here from what happened, never from what the server sent (a status is named by its
standard phrase, a media type only when it looks like one, a protocol error by its kind).
"""

from __future__ import annotations

import errno
import http
import http.client
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NoReturn, Protocol

import httpx

from ._files import GGUF_MAGIC, PartFile
from ._headers import content_length, parse_content_range
from ._redact import redact_text, redact_url

__all__ = [
    "Answer",
    "Dropped",
    "Exchange",
    "ExchangeLimits",
    "Failure",
    "accepted_range",
    "amount",
    "check_redirect",
    "described",
    "tls_cause",
    "write_failure",
]

_REDIRECTS = (301, 302, 303, 307, 308)
#: Seconds a 200 answer's first body bytes are waited for, to refuse a body that is no GGUF file
#: before the server has sent much of it (a server holding the body costs a download that long).
_FIRST_BYTES_WAIT = 0.2
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Failure(Exception):
    """Ends a transfer in `failed`; `discard_part` when the bytes on disk cannot be resumed."""

    def __init__(self, reason: str, *, discard_part: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.discard_part = discard_part


class Dropped(Exception):
    """One attempt ended early but the download may go on: retry after a backoff.

    `progressed`: the attempt received bytes (so the backoff starts again from the
    beginning).  `start_over`: the bytes on disk are no good for a resume.
    """

    def __init__(self, reason: str, *, progressed: bool = False, start_over: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.progressed = progressed
        self.start_over = start_over


class ExchangeLimits(Protocol):
    """Timeouts (seconds) and sizes (bytes) of one attempt: what an exchange reads of `DownloadPolicy`."""

    @property
    def connect_timeout(self) -> float: ...
    @property
    def read_timeout(self) -> float: ...
    @property
    def max_redirects(self) -> int: ...
    @property
    def read_bytes(self) -> int: ...
    @property
    def flush_bytes(self) -> int: ...
    @property
    def flush_interval(self) -> float: ...
    @property
    def write_back_bytes(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Answer:
    """The status line and headers of the answer a body will come from."""

    url: httpx.URL
    status: int
    #: Header names in lower case (the last one wins); values as latin-1, as `http.client` reads them.
    headers: dict[str, str]
    #: The body's first bytes (up to 4) of a 200 answer, looked at before anything else is done.
    head: bytes = b""

    def not_gguf(self) -> Failure | None:
        """The `Failure` of an answer whose body starts the file and does not start like a GGUF file
        (its connection is closed already), or None."""
        if self.status != 200 or not self.head or GGUF_MAGIC.startswith(self.head):
            return None
        return Failure(f"the server's response is not a GGUF file ({described(self)})", discard_part=True)


@dataclass(frozen=True, slots=True)
class BodyRules:
    """What the body of an accepted answer must respect while it is written from `offset` on."""

    offset: int
    #: The file's size, None when the server did not say.
    total: int | None
    #: `max_download_size`: the most a body of unknown size may bring.
    limit: int
    #: Bytes that may still be written (the free margin kept); asked before each write when
    #: `total` is None.  Raises `Failure`.
    room: Callable[[], int]
    #: Raises the `Failure` of a download that needs `needed` more bytes where `room` may be
    #: written, after `received` bytes: `no_room(needed, room, received)`.
    no_room: Callable[[int, int, int], NoReturn]


class Exchange:
    """One attempt's HTTP exchange, run by one worker thread; `abort` and the counters may be
    used from any other thread.

    `open` then `receive` (or `close`), in that order, in the worker thread.
    """

    def __init__(self, limits: ExchangeLimits, user_agent: str) -> None:
        self._limits = limits
        self._user_agent = user_agent
        self._lock = threading.Lock()
        self._aborted = False
        self._connection: http.client.HTTPConnection | None = None
        # kept apart: the connection forgets its socket once an answer says it closes the connection
        self._socket: socket.socket | None = None
        self._response: http.client.HTTPResponse | None = None
        #: Body bytes received by this attempt (written, or held to be written).
        self.received = 0

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        """Stop the exchange from another thread: the socket is shut down, so a blocked read or
        write returns, and no new connection is made.  Idempotent; never raises."""
        with self._lock:
            self._aborted = True
            sock = self._socket
            if sock is not None:
                try:
                    # the plain socket's shutdown: an SSLSocket's own would tear its TLS state down
                    # under the reading thread
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass  # not connected (yet), or already closed

    def close(self) -> None:
        """Close the connection (an unread body is never read)."""
        with self._lock:
            connection, sock, response = self._connection, self._socket, self._response
            self._connection = self._socket = self._response = None
        if response is not None:
            response.close()  # its file holds the socket open
        if connection is not None:
            connection.close()
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------ the request

    def open(self, url: httpx.URL, authorization: str | None, headers: dict[str, str]) -> Answer:
        """GET `url` and return the answer a body will come from, redirects followed.

        `authorization` goes on the first request, and on a redirect only within the origin
        or from http up to https on the same host.  A redirect's body is never read.
        Raises `Failure` for a redirect to a scheme other than http(s), from https down to
        http, or past `max_redirects`, and for a TLS error; `Dropped` for a connection that
        failed, timed out or broke HTTP.
        """
        for _ in range(self._limits.max_redirects + 1):
            answer = self._request(url, authorization, headers)
            location = answer.headers.get("location")
            if answer.status not in _REDIRECTS or location is None:
                return self._looked_at(answer)
            self.close()
            following = _redirect_url(url, location)
            check_redirect(url, following)
            if authorization is not None and not _keeps_authorization(url, following):
                authorization = None
            url = following
        raise Failure(f"too many redirects (more than {self._limits.max_redirects})")

    def _request(self, url: httpx.URL, authorization: str | None, headers: dict[str, str]) -> Answer:
        limits = self._limits
        host, port = url.host, url.port
        connection: http.client.HTTPConnection
        if url.scheme == "https":
            connection = http.client.HTTPSConnection(host, port, timeout=limits.connect_timeout,
                                                     context=ssl.create_default_context())
        else:
            connection = http.client.HTTPConnection(host, port, timeout=limits.connect_timeout)
        with self._lock:
            if self._aborted:
                raise Dropped("aborted")
            self._connection = connection
        sent = {"Accept": "*/*", "Accept-Encoding": "identity", "User-Agent": self._user_agent,
                "Connection": "close", **headers}
        if authorization is not None:
            sent["Authorization"] = authorization
        try:
            connection.connect()
            assert connection.sock is not None
            with self._lock:
                self._socket = connection.sock
                if self._aborted:
                    raise Dropped("aborted")
            connection.sock.settimeout(limits.read_timeout)
            target = url.raw_path.decode("ascii")
            connection.request("GET", target, headers=sent)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise _translate(exc, connecting=connection.sock is None) from exc
        self._response = response
        names = {name.lower(): value for name, value in response.getheaders()}
        return Answer(url, response.status, names)

    def _looked_at(self, answer: Answer) -> Answer:
        """`answer` with the first bytes of its body when it is a 200 (the file from its start) and
        they arrive within `_FIRST_BYTES_WAIT` (the body is checked again as it is received); a body
        that is no GGUF file is not read any further: its connection is closed at once, before the
        server sends much more of it."""
        response, sock = self._response, self._socket
        if answer.status != 200 or response is None or response.chunked or response.length == 0:
            return answer
        if sock is None or not select.select([sock], [], [], _FIRST_BYTES_WAIT)[0]:
            return answer  # nothing came after the head (the file's own buffer may hold some: left alone)
        assert response.fp is not None
        try:
            head = response.fp.peek(len(GGUF_MAGIC))[:len(GGUF_MAGIC)]
        except (OSError, http.client.HTTPException) as exc:
            raise _translate(exc, connecting=False) from exc
        answer = replace(answer, head=head)
        if answer.not_gguf() is not None:
            self.close()
        return answer

    # ------------------------------------------------------------ the body

    def receive(self, part: PartFile, rules: BodyRules, answer: Answer) -> None:
        """Write the body to `part` (open at `rules.offset`); sync the file once the body is complete.

        See `_receive`; the connection is closed when this returns (a refused body is not
        read any further).
        """
        try:
            self._receive(part, rules, answer)
        finally:
            self.close()

    def _receive(self, part: PartFile, rules: BodyRules, answer: Answer) -> None:
        """Write the body to `part` (open at `rules.offset`); sync the file once the body is complete.

        The GGUF magic is checked on the file's first bytes before anything is written.
        Bytes received are written once `flush_bytes` are held or `flush_interval` passed,
        and whatever is held when the body ends early, an error breaks it or `abort` is
        called; each `write_back_bytes` written are put on their way to the disk
        (`posix_fadvise` DONTNEED: the write-back starts, nobody waits for it, and the page
        cache does not fill with the file).  Returns early, without an error, once aborted.

        Raises `Dropped` when the body ends early or the connection breaks, `Failure` when
        it is not a GGUF file, is longer than announced or than `max_download_size`, or the
        disk has no room or fails.
        """
        response = self._response
        assert response is not None
        limits = self._limits
        total, offset = rules.total, rules.offset
        buffer = bytearray(max(limits.read_bytes, limits.flush_bytes))
        view = memoryview(buffer)
        held = 0  # bytes in the buffer, not written yet
        # the file's first bytes until the GGUF magic is checked (a resumed .part's were checked before
        # the request: they are the magic, or a piece of it when the first connection dropped that early)
        magic_checked = offset >= len(GGUF_MAGIC)
        head = GGUF_MAGIC[:offset]
        # what the framing allows: the Content-Length, or to the end of the connection
        remaining = response.length if not response.chunked else None
        written_back = offset  # where the last write-back advice ended
        last_write = time.monotonic()

        def write(size: int) -> None:
            nonlocal held, written_back, last_write
            if size:
                try:
                    part.write(view[:size])
                    end = part.position
                    if end - written_back >= limits.write_back_bytes:
                        part.write_back(written_back, end)
                        written_back = end
                except OSError as exc:
                    raise write_failure(part.path, exc) from exc
            held, last_write = 0, time.monotonic()

        def write_held() -> None:
            """Write what is held; with no size announced, only what fits (then `Failure`)."""
            if not held:
                return
            if total is None:
                room = rules.room()
                if held > room:  # what still fits is kept for a resume once space is freed
                    needed, kept = held, max(room, 0)
                    write(kept)
                    self.received -= needed - kept
                    rules.no_room(needed, room, offset + self.received)
            write(held)

        while True:
            if remaining == 0:
                break
            into = view[held:]
            if remaining is not None and remaining < len(into):
                into = into[:remaining]
            try:
                if response.chunked:
                    data = response.read1(len(into))
                    count = len(data)
                    into[:count] = data
                else:
                    assert response.fp is not None
                    count = response.fp.readinto1(into)
            except (OSError, http.client.HTTPException) as exc:
                if self._aborted:
                    break
                translated = _translate(exc, connecting=False)
                if isinstance(translated, Dropped):
                    translated.progressed = self.received > 0
                    write_held()  # what arrived is kept for the resume
                raise translated from exc
            if not count:
                break
            if remaining is not None:
                remaining -= count
            if not magic_checked:
                head += bytes(into[:min(count, len(GGUF_MAGIC))])
                if len(head) >= len(GGUF_MAGIC):
                    if not head.startswith(GGUF_MAGIC):
                        raise Failure(f"the server's response is not a GGUF file ({described(answer)})",
                                      discard_part=True)
                    magic_checked = True
            held += count
            self.received += count
            downloaded = offset + self.received
            if total is not None and downloaded > total:
                raise Failure(f"the server sent more than the {total} bytes it announced", discard_part=True)
            if total is None and downloaded > rules.limit:
                raise Failure(f"too large: the server sent more than {amount(rules.limit)} without"
                              f" announcing a size; the limit is {amount(rules.limit)}"
                              " (max_download_size)", discard_part=True)
            if magic_checked and (held >= limits.flush_bytes or held == len(buffer)
                                  or time.monotonic() - last_write >= limits.flush_interval):
                write_held()
            if self._aborted:
                break
        write_held()  # whatever arrived is kept for a resume, even when the transfer is being stopped
        if self._aborted:
            return
        downloaded = offset + self.received
        if total is not None and downloaded < total:
            raise Dropped(f"the connection closed after {downloaded} of {total} bytes",
                          progressed=self.received > 0)
        try:
            part.sync()
        except OSError as exc:
            raise write_failure(part.path, exc) from exc


def _redirect_url(origin: httpx.URL, location: str) -> httpx.URL:
    """Where a `Location` header leads from `origin` (relative, or absolute without a host: as httpx did)."""
    try:
        url = httpx.URL(location)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise Dropped("RemoteProtocolError: invalid URL in location header") from None
    if url.scheme and not url.host:
        url = url.copy_with(host=origin.host)
    if url.is_relative_url:
        url = origin.join(url)
    return url.copy_with(userinfo=b"") if url.userinfo else url


def _port_of(url: httpx.URL) -> int | None:
    return url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme)


def _keeps_authorization(origin: httpx.URL, target: httpx.URL) -> bool:
    """Whether the credentials may follow a redirect: to the same origin, or from http up to
    https on the same host and the default ports (httpx's rule)."""
    if (origin.scheme, origin.host, _port_of(origin)) == (target.scheme, target.host, _port_of(target)):
        return True
    return (origin.host == target.host and origin.scheme == "http" and _port_of(origin) == 80
            and target.scheme == "https" and _port_of(target) == 443)


_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]{0,19}")


def check_redirect(origin: httpx.URL, target: httpx.URL) -> None:
    """Raise `Failure` for a redirect zenow does not follow: to a scheme other than http(s), or https -> http."""
    scheme = target.scheme
    if scheme not in ("http", "https"):
        shown = repr(scheme) if _SCHEME.fullmatch(scheme) else "that is not http"
        raise Failure(f"redirect refused: {redact_url(str(origin))} redirected to a URL with scheme {shown};"
                      " only http and https URLs are followed")
    if origin.scheme == "https" and scheme == "http":
        raise Failure(f"redirect refused: {redact_url(str(origin))} redirected from https down to plain http")


def accepted_range(answer: Answer, offset: int, known_total: int | None) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's size (None when unknown), from the status.

    Raises `Dropped` for a retry (with `start_over` when the `.part` must go) and
    `Failure` for an answer that ends the download.
    """
    status = answer.status
    if status == 206:
        cr = parse_content_range(answer.headers.get("content-range"))
        if cr is None or cr.first != offset:
            raise Dropped(f"the server answered a range other than bytes={offset}-", start_over=True)
        if known_total is not None and cr.complete is not None and cr.complete != known_total:
            raise Dropped(f"the file changed on the server ({known_total} -> {cr.complete} bytes)",
                          start_over=True)
        return offset, cr.complete
    if status == 200:
        return 0, content_length(answer.headers)
    if status == 416 and offset:
        cr = parse_content_range(answer.headers.get("content-range"))
        if cr is not None and cr.complete == offset:
            return offset, offset
        raise Dropped("the server refused to resume", start_over=True)
    reason = _status_text(status)
    if status in (408, 425, 429) or status >= 500:
        raise Dropped(reason)
    raise Failure(f"{reason} from {redact_url(str(answer.url))}", discard_part=True)


def _status_text(status: int) -> str:
    """`HTTP 404 Not Found`: the standard phrase, never the one the server sent."""
    try:
        return f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+\-]{1,64}/[a-z0-9!#$&^_.+\-]{1,64}")


def described(answer: Answer) -> str:
    """`HTTP 200, text/html`: the status and the media type of an answer, never its content."""
    raw = answer.headers.get("content-type")
    if raw is None:
        media = "no Content-Type"
    else:
        media = raw.split(";", 1)[0].strip().lower()
        if not _MEDIA_TYPE.fullmatch(media):
            media = "an unreadable Content-Type"
    return f"HTTP {answer.status}, {media}"


def _translate(exc: OSError | http.client.HTTPException, *, connecting: bool) -> Dropped | Failure:
    """A socket or `http.client` error as a retry (a dropped, refused or stalled connection, an
    answer that breaks HTTP) or a failure (TLS).

    Named as httpx named them (`ConnectError`, `ReadTimeout`, `RemoteProtocolError`...).
    The text never quotes what the server sent: `http.client` puts the offending line in
    its exceptions, so a protocol error is named by its kind only.
    """
    tls = tls_cause(exc)
    if tls is not None and not isinstance(exc, TimeoutError):
        return Failure(f"TLS error: {tls}")
    if isinstance(exc, http.client.RemoteDisconnected):
        return Dropped("RemoteProtocolError: Server disconnected without sending a response.")
    if isinstance(exc, http.client.BadStatusLine):
        return Dropped("RemoteProtocolError: illegal status line")
    if isinstance(exc, http.client.IncompleteRead):
        return Dropped("RemoteProtocolError: peer closed connection without sending complete message body")
    if isinstance(exc, http.client.LineTooLong):
        return Dropped("RemoteProtocolError: a line of the answer is too long")
    if isinstance(exc, http.client.HTTPException):
        return Dropped(f"RemoteProtocolError: {type(exc).__name__}")
    if isinstance(exc, TimeoutError):
        return Dropped("ConnectTimeout: timed out" if connecting else "ReadTimeout: timed out")
    name = "ConnectError" if connecting else "ReadError"
    text = redact_text(f"[Errno {exc.errno}] {exc.strerror}" if exc.errno is not None else str(exc))
    return Dropped(f"{name}: {text}" if text else name)


def tls_cause(exc: BaseException) -> ssl.SSLError | None:
    """The `ssl.SSLError` that `exc` is or was raised from, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def write_failure(part: os.PathLike[str] | str, exc: OSError) -> Failure:
    """The `Failure` of a `.part` that cannot be written (the disk is full, or fails)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Failure(f"disk full while writing {part}: {exc.strerror}")
    return Failure(f"cannot write {part}: {exc.strerror or exc}")


def amount(size: int) -> str:
    """A byte count for people: `512 bytes`, `256 KiB`, `1.5 GiB`."""
    if size < 1024:
        return f"{size} bytes"
    value, unit = size / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"

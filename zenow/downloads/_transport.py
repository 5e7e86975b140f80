"""The download client's transport: httpx's own, whose connections read the body in large pieces.

httpcore asks the socket for at most 64 KiB a read, and every read of a body climbs
through a dozen Python frames (httpcore, h11, httpx) on the event loop: a 1 GiB model is
16,384 of them.  Asking for up to `read_bytes` instead returns whatever the kernel holds
(hundreds of KiB when the disk or the event loop lagged) in one read, and never waits for
more: a slow server's bytes are handed over as they come, as before.  A connection reads
as httpcore asks until it has received `read_bytes`: a response's head and a body's first
bytes come as before, so a body that is no GGUF file is refused before much more of it
is taken in.
"""

from __future__ import annotations

import ssl
import typing

import httpcore
import httpx

__all__ = ["WideReadTransport"]


class WideReadTransport(httpx.AsyncHTTPTransport):
    """`httpx.AsyncHTTPTransport` (no proxy, certificates verified, the environment not read)
    whose reads ask for up to `read_bytes`."""

    def __init__(self, read_bytes: int) -> None:
        super().__init__(trust_env=False)
        # httpx takes no network backend: the pool it built is replaced by one with ours
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            network_backend=_WideReads(httpcore.TrioBackend(), read_bytes),
        )


class _WideReads(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend, read_bytes: int) -> None:
        self._inner = inner
        self._read_bytes = read_bytes

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _WideStream(stream, self._read_bytes)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _WideStream(await self._inner.connect_unix_socket(path, timeout, socket_options), self._read_bytes)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _WideStream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream, read_bytes: int) -> None:
        self._inner = inner
        self._read_bytes = read_bytes
        self._narrow_for = read_bytes

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._narrow_for > 0:
            data = await self._inner.read(max_bytes, timeout)
            self._narrow_for -= len(data)
            return data
        return await self._inner.read(max(max_bytes, self._read_bytes), timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _WideStream(await self._inner.start_tls(ssl_context, server_hostname, timeout), self._read_bytes)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)

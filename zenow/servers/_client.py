"""The HTTP client zenow talks to a mode's server with: its child llama-server, or a remote backend.

llama-server (cpp-httplib) closes a kept-alive connection once it has been idle for 5 s,
and httpx keeps an idle connection for 5 s too: a request sent on one just as the server
closes it is lost ("Server disconnected without sending a response"), and a chat or a
`/v1` request sent about five seconds after the one before would fail for no reason of
its own.  Idle connections are therefore dropped well before the server drops them.

After a streamed answer, llama-server closes the connection without saying so (no
`Connection: close`): a client that read the stream to its end puts the connection back
in its pool, and the next request sent on it is lost the same way (measured: 21 of 120
requests, one after another on one client).  A streamed request therefore asks for the
close itself (`STREAM_HEADERS`), and httpx never keeps its connection.  It also asks for
the answer uncompressed: streams are read as raw bytes (`zenow.event_stream`), with no
decoder between the socket and the reader.
"""

from __future__ import annotations

import httpx

__all__ = ["KEEPALIVE_EXPIRY", "STREAM_HEADERS", "upstream_client"]

#: Seconds an idle connection to a server is kept for the next request (llama-server's own: 5).
KEEPALIVE_EXPIRY = 2.0
#: The headers of a streamed request to a server: its connection ends with the stream, its bytes are
#: sent as they are.
STREAM_HEADERS = {"Connection": "close", "Accept-Encoding": "identity"}


def upstream_client(timeout: httpx.Timeout, keepalive_connections: int = 8) -> httpx.AsyncClient:
    """A client for a mode's server: no proxy or environment, no pool limit (the HTTP front caps
    open connections), at most `keepalive_connections` idle ones kept for `KEEPALIVE_EXPIRY`."""
    return httpx.AsyncClient(
        timeout=timeout, trust_env=False,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=keepalive_connections,
                            keepalive_expiry=KEEPALIVE_EXPIRY),
    )

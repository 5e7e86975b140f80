"""The HTTP client zenow talks to a mode's server with: its child llama-server, or a remote backend.

llama-server (cpp-httplib) closes a kept-alive connection once it has been idle for 5 s,
and httpx keeps an idle connection for 5 s too: a request sent on one just as the server
closes it is lost ("Server disconnected without sending a response"), and a chat or a
`/v1` request sent about five seconds after the one before would fail for no reason of
its own.  Idle connections are therefore dropped well before the server drops them.
"""

from __future__ import annotations

import httpx

__all__ = ["KEEPALIVE_EXPIRY", "upstream_client"]

#: Seconds an idle connection to a server is kept for the next request (llama-server's own: 5).
KEEPALIVE_EXPIRY = 2.0


def upstream_client(timeout: httpx.Timeout, keepalive_connections: int = 8) -> httpx.AsyncClient:
    """A client for a mode's server: no proxy or environment, no pool limit (the HTTP front caps
    open connections), at most `keepalive_connections` idle ones kept for `KEEPALIVE_EXPIRY`."""
    return httpx.AsyncClient(
        timeout=timeout, trust_env=False,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=keepalive_connections,
                            keepalive_expiry=KEEPALIVE_EXPIRY),
    )

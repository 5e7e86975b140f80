"""The API keys of zenow's llama-server children, and the httpx auth that sends them.

Each child gets a random key of its own (`--api-key` through the environment variable
`LLAMA_API_KEY`, never on its command line, so `ps` does not show it): another user of
the machine who finds the child's port on 127.0.0.1 cannot use it.  Every httpx client of
zenow that talks to a child is built with `child_auth()`, which adds the key of whichever
child a request goes to; a request to anything else goes out unchanged.
"""

from __future__ import annotations

import secrets
from collections.abc import Generator

import httpx

__all__ = ["child_auth", "forget_key", "new_key"]

#: host:port of a child → its key.  Written by the server actors (one event loop), read by
#: the auth flow of every client; entries live as long as their child.
_keys: dict[str, str] = {}


def new_key(port: int) -> str:
    """A fresh key for the child about to listen on 127.0.0.1:`port`, registered for requests to it."""
    key = secrets.token_urlsafe(32)
    _keys[f"127.0.0.1:{port}"] = key
    return key


def forget_key(port: int) -> None:
    """The child on `port` is gone: stop sending its key there."""
    _keys.pop(f"127.0.0.1:{port}", None)


class _ChildAuth(httpx.Auth):
    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        key = _keys.get(f"{request.url.host}:{request.url.port}")
        if key is not None:
            request.headers["Authorization"] = f"Bearer {key}"
        yield request


_AUTH = _ChildAuth()


def child_auth() -> httpx.Auth:
    """The auth for httpx clients that talk to zenow's llama-server children."""
    return _AUTH

"""zenow's HTTP API as the terminal client uses it: one httpx client, errors as one line.

Every failure reaches the user as a `ClientError` whose text is one line: nothing
answers at the URL (`Unreachable`), the URL is no URL, zenow answered an error (its
`detail`), or the answer was not what zenow sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from ._sse import sse_data

__all__ = ["DEFAULT_URL", "ClientError", "Unreachable", "ZenowAPI"]

DEFAULT_URL = "http://127.0.0.1:8050"

#: Seconds to connect; a read waits longer (a load or a reply on a CPU can take minutes).
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0


class ClientError(Exception):
    """Something the user must hear about; `str()` is one line."""


class Unreachable(ClientError):
    """Nothing answers at the URL."""


def _detail(response: httpx.Response) -> str:
    """What an error answer says: its `detail` (or OpenAI-style `error.message`), else its status."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        detail = body.get("detail")
        error = body.get("error")
        if isinstance(detail, str):
            return detail
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


class ZenowAPI:
    """A zenow at `url`.  Each method raises `ClientError` (see the module docstring)."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            self._http = httpx.Client(
                base_url=self.url, headers=headers, trust_env=False,
                timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT),
            )
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            raise ClientError(f"not a URL zenow can be reached at: {url!r} ({exc})") from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ZenowAPI:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ plain requests

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._json(self._send("GET", path, params=params))

    def post(self, path: str, body: dict[str, Any], *, timeout: float | None = READ_TIMEOUT) -> Any:
        return self._json(self._send("POST", path, json=body, timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT)))

    def delete(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._json(self._send("DELETE", path, params=params))

    # ------------------------------------------------------------ streams

    @contextmanager
    def events(self, types: str | None = None) -> Iterator[Iterator[dict[str, Any]]]:
        """The live events (`/api/events`), each a dict with `type`; the first is the snapshot.

        The stream is open until the block ends; reading waits for the next event.
        """
        params = {"types": types} if types else None
        # No read timeout: zenow sends a ping comment every 15 s, and a quiet stream is no error.
        with self._stream("GET", "/api/events", params=params, timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT)) \
                as response:
            yield (json.loads(data) for data in sse_data(response.iter_lines()))

    @contextmanager
    def chat(self, body: dict[str, Any]) -> Iterator[Iterator[str]]:
        """The pieces of a streamed reply (`POST /api/chat` with `stream: true`), as they come.

        Raises `ClientError` when zenow refuses the chat or the reply fails midway.
        """
        with self._stream("POST", "/api/chat", json={**body, "stream": True},
                          timeout=httpx.Timeout(None, connect=CONNECT_TIMEOUT)) as response:
            yield self._deltas(response)

    def _deltas(self, response: httpx.Response) -> Iterator[str]:
        for data in sse_data(self._lines(response)):
            if data == "[DONE]":
                return
            try:
                frame = json.loads(data)
            except ValueError:
                raise ClientError(f"zenow sent a chat frame that is not JSON: {data[:80]!r}") from None
            if "error" in frame:
                raise ClientError(f"the reply failed: {frame['error']}")
            for choice in frame.get("choices", ()):
                content = choice.get("delta", {}).get("content")
                if content:
                    yield content
        raise ClientError("the reply was cut off before its end")

    def _lines(self, response: httpx.Response) -> Iterator[str]:
        try:
            yield from response.iter_lines()
        except httpx.HTTPError as exc:
            raise self._translated(exc) from None

    # ------------------------------------------------------------ internals

    def _send(self, method: str, path: str, **options: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **options)
        except httpx.HTTPError as exc:
            raise self._translated(exc) from None
        self._check(response)
        return response

    @contextmanager
    def _stream(self, method: str, path: str, **options: Any) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(method, path, **options) as response:
                if response.is_error:
                    response.read()
                    self._check(response)
                yield response
        except httpx.HTTPError as exc:
            raise self._translated(exc) from None

    def _check(self, response: httpx.Response) -> None:
        if response.status_code == 401:
            raise ClientError(f"zenow at {self.url} wants an API key: set ZENOW_API_KEY ({_detail(response)})")
        if response.is_error:
            raise ClientError(_detail(response))

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError:
            raise ClientError(f"{self.url} answered something that is not zenow's JSON "
                              f"(HTTP {response.status_code})") from None

    def _translated(self, exc: httpx.HTTPError) -> ClientError:
        if isinstance(exc, httpx.ConnectError):
            reason = str(exc).split("] ", 1)[-1] or "connection failed"
            return Unreachable(f"nothing answers at {self.url} ({reason}); start zenow with `zenow serve`, "
                               "or give --url or ZENOW_URL")
        if isinstance(exc, httpx.ConnectTimeout):
            return Unreachable(f"nothing answers at {self.url} (no connection within {CONNECT_TIMEOUT:.0f} s); "
                               "give --url or ZENOW_URL")
        if isinstance(exc, httpx.TimeoutException):
            return ClientError(f"zenow at {self.url} did not answer in time ({type(exc).__name__})")
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
            return ClientError(f"not a URL zenow can be reached at: {self.url!r}")
        if isinstance(exc, httpx.RemoteProtocolError):
            return ClientError(f"{self.url} does not speak HTTP as zenow does ({exc})")
        return ClientError(f"talking to zenow at {self.url} failed: {type(exc).__name__}: {exc}")

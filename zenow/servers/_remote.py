"""A mode served by a remote backend instead of a local llama-server child.

A mode whose `backend_url` parameter is set starts no child: its server actor runs a
`RemoteMonitor`, which health-checks the backend every `interval` seconds (`/health`;
a backend without one, such as an OpenAI-style farm, through `/v1/models`) and reports
`starting`, `running` or `error` as a `RemoteState`.  Each time the backend comes up, the
monitor also learns what it serves: the model name to send (the `backend_model`
parameter, else the first model `/v1/models` lists), whether it counts tokens
(`/tokenize`; otherwise zenow estimates them) and its context per conversation
(llama-server's `/props`); and a backend that refuses the key is an `error` saying so.

The backend's key (`backend_api_key`) is a secret: it is kept in a file of its own,
readable by zenow's user only (`BackendKeys`, under `<home>/secrets/`, not in the
database, so `zenow backup` copies never hold it), sent only in the `Authorization`
header of requests to that backend, and never shown: parameter answers say
`backend_api_key_set`, statuses, events and logs carry the URL only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import trio

from ..errors import InvalidRequest
from ..settings import Mode

__all__ = [
    "KEY_PARAM",
    "KEY_SET_PARAM",
    "Backend",
    "BackendKeys",
    "KeyChange",
    "RemoteMonitor",
    "RemoteState",
    "split_key_change",
]

log = logging.getLogger(__name__)

#: The write-only parameter that sets (or, with "" or null, clears) the backend's key.
KEY_PARAM = "backend_api_key"
#: What parameter answers show instead: whether a key is set.
KEY_SET_PARAM = "backend_api_key_set"
MAX_KEY_LENGTH = 4096
#: Seconds one health check (or detail request) may take before the backend counts as down.
CHECK_TIMEOUT = 5.0


@dataclass(frozen=True)
class KeyChange:
    """An update's `backend_api_key`: the new key, or None to clear it."""

    key: str | None = field(repr=False)


def split_key_change(changes: object) -> tuple[object, KeyChange | None]:
    """Take the key out of a parameter update: (the other changes, the key change or None).

    The read-only `backend_api_key_set` a client may send back from get_param is dropped.
    Raises `InvalidRequest` naming `backend_api_key` when the key cannot be sent in a
    header; the message never repeats the key.
    """
    if not isinstance(changes, dict) or (KEY_PARAM not in changes and KEY_SET_PARAM not in changes):
        return changes, None
    rest = {k: v for k, v in changes.items() if k not in (KEY_PARAM, KEY_SET_PARAM)}
    if KEY_PARAM not in changes:
        return rest, None
    key = changes[KEY_PARAM]
    if key is None or key == "":
        return rest, KeyChange(None)
    if not isinstance(key, str):
        raise InvalidRequest(f"{KEY_PARAM}: must be a string (or \"\" or null to clear it)", param=KEY_PARAM)
    if len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable() or key != key.strip():
        raise InvalidRequest(f"{KEY_PARAM}: must be at most {MAX_KEY_LENGTH} printable ASCII characters "
                             "without leading or trailing spaces", param=KEY_PARAM)
    return rest, KeyChange(key)


class BackendKeys:
    """The backends' keys, one file per mode under `folder` (0700), each 0600."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder

    def _path(self, mode: Mode) -> Path:
        return self._folder / f"backend-{mode}.key"

    async def read(self, mode: Mode) -> str | None:
        """The key of `mode`'s backend, or None.  A file that cannot be read is logged and taken as none."""
        def read() -> str | None:
            try:
                return self._path(mode).read_text(encoding="ascii").strip() or None
            except FileNotFoundError:
                return None
        try:
            return await trio.to_thread.run_sync(read)
        except (OSError, UnicodeDecodeError) as exc:
            log.error("%s: cannot read the backend key file %s: %s", mode, self._path(mode), exc)
            return None

    async def write(self, mode: Mode, key: str | None) -> None:
        """Store (or, with None, delete) `mode`'s key; written whole or not at all.  Raises `OSError`."""
        path = self._path(mode)

        def write() -> None:
            if key is None:
                path.unlink(missing_ok=True)
                return
            self._folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self._folder, 0o700)
            partial = path.with_suffix(".part")
            partial.unlink(missing_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as file:
                file.write(key + "\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, path)

        await trio.to_thread.run_sync(write)


@dataclass(frozen=True)
class Backend:
    """Where a mode is served: the backend's root URL (checked, without credentials), the
    model name to send ("": the first it lists), and its key."""

    url: str
    model: str = ""
    key: str | None = field(default=None, repr=False)

    @property
    def authorization(self) -> str | None:
        """The `Authorization` header value requests to the backend carry, or None."""
        return f"Bearer {self.key}" if self.key else None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}


@dataclass(frozen=True)
class RemoteState:
    """What the monitor found; the server actor turns it into the mode's status."""

    status: Literal["starting", "running", "error"]
    #: The model name sent to the backend (and shown as the mode's model), when known.
    model_name: str | None = None
    error_message: str | None = None
    #: Tokens per conversation, when the backend says (llama-server's `/props`).
    context_size: int | None = None
    #: Whether the backend has `/tokenize` (else token counts are zenow's estimate).
    tokenize: bool = False


class _Down(Exception):
    """The backend is down or refuses us; the message says why (for the status)."""


class RemoteMonitor:
    """Watches one backend until `stop()`; `report` gets each new `RemoteState` (never after `stop()`).

    Run it with `nursery.start_soon(monitor.run)`; it owns its HTTP client and closes it.
    """

    def __init__(self, backend: Backend, report: Callable[[RemoteState], None], interval: float) -> None:
        self.backend = backend
        self._report = report
        self._interval = interval
        self._scope = trio.CancelScope()
        #: Whether `/health` exists; False once it answered 404 (then `/v1/models` is asked).
        self._has_health = True
        self._last: RemoteState | None = None

    def stop(self) -> None:
        """Stop checking; nothing is reported after this returns."""
        self._scope.cancel()

    async def run(self) -> None:
        with self._scope:
            self._publish(RemoteState("starting", self.backend.model or None))
            async with httpx.AsyncClient(timeout=httpx.Timeout(CHECK_TIMEOUT), trust_env=False,
                                         headers=self.backend.headers()) as http:
                while True:
                    await self.check(http)
                    await trio.sleep(self._interval)

    async def check(self, http: httpx.AsyncClient) -> None:
        """One health check (and, when the backend just came up, what it serves); reports the result."""
        last = self._last
        try:
            listed = await self._healthy(http)
            if last is not None and last.status == "running":
                return
            state = await self._details(http, listed)
        except _Down as exc:
            model = last.model_name if last is not None else self.backend.model or None
            state = RemoteState("error", model, f"backend {self.backend.url} {exc}")
        if last is None or state != last:
            if state.status == "error":
                log.warning("%s", state.error_message)
            else:
                log.info("backend %s is up (model %s, token counts by %s)", self.backend.url,
                         state.model_name, "its /tokenize" if state.tokenize else "estimate")
        self._publish(state)

    def _publish(self, state: RemoteState) -> None:
        if self._scope.cancel_called or state == self._last:
            return
        self._last = state
        self._report(state)

    async def _get(self, http: httpx.AsyncClient, path: str) -> httpx.Response:
        try:
            return await http.get(self.backend.url + path)
        except httpx.HTTPError as exc:
            raise _Down(f"cannot be reached: {type(exc).__name__}: {exc}".rstrip(": ")) from None

    async def _healthy(self, http: httpx.AsyncClient) -> Any:
        """Return `/v1/models`' answer when that was the check (else None); raise `_Down`."""
        if self._has_health:
            response = await self._get(http, "/health")
            if response.status_code == 200:
                return None
            if response.status_code not in (404, 405, 501):
                raise _Down(_refusal("/health", response))
            self._has_health = False  # a farm without /health: /v1/models tells as much
        response = await self._get(http, "/v1/models")
        if response.status_code != 200:
            raise _Down(_refusal("/v1/models", response))
        return _json(response)

    async def _details(self, http: httpx.AsyncClient, listed: Any) -> RemoteState:
        """What a backend that just came up serves; raises `_Down` when it refuses the key."""
        if listed is None:
            response = await self._get(http, "/v1/models")  # unlike /health, it needs the key
            _check_key("/v1/models", response)
            listed = _json(response) if response.status_code == 200 else None
        model = self.backend.model or _first_model(listed)
        try:
            response = await http.post(self.backend.url + "/tokenize", json={"content": "zenow"})
        except httpx.HTTPError:
            counts = False
        else:
            _check_key("/tokenize", response)
            answer = _json(response)
            counts = response.status_code == 200 and isinstance(answer, dict) and isinstance(answer.get("tokens"),
                                                                                             list)
        return RemoteState("running", model, None, await self._context(http), counts)

    async def _context(self, http: httpx.AsyncClient) -> int | None:
        try:
            response = await http.get(self.backend.url + "/props")
        except httpx.HTTPError:
            return None
        try:
            n_ctx = _json(response)["default_generation_settings"]["n_ctx"]
        except (KeyError, TypeError):
            return None
        return n_ctx if response.status_code == 200 and isinstance(n_ctx, int) and n_ctx > 0 else None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _first_model(listed: Any) -> str | None:
    try:
        name = listed["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        return None
    return name if isinstance(name, str) and name else None


def _check_key(path: str, response: httpx.Response) -> None:
    """Raise `_Down` when `response` says the backend refuses the key (or its absence)."""
    if response.status_code in (401, 403):
        raise _Down(_refusal(path, response))


def _refusal(path: str, response: httpx.Response) -> str:
    """Why `response` means the backend cannot serve, in a few words."""
    body = _json(response)
    message = body.get("error") if isinstance(body, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    if response.status_code in (401, 403):
        # its own words are left out: some services echo part of the key they were sent
        return f"refused the key ({path} answered {response.status_code}): check backend_api_key"
    said = f": {str(message)[:200]}" if message else ""
    return f"is not ready ({path} answered {response.status_code}{said})"

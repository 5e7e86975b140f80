"""Reading request bodies: strict JSON that cannot hurt whoever handles it.

Every body zenow reads is UTF-8 JSON, at most `MAX_DEPTH` levels deep, whose strings
are valid Unicode (no lone surrogates: SQLite, httpx and llama-server cannot take
them).  Anything else is the client's error and answers 400 naming what is wrong,
before a route or an actor ever sees the value.
"""

from __future__ import annotations

import json
from typing import Any

from quart_trio.wrappers import TrioRequest
from werkzeug.exceptions import BadRequest

__all__ = ["MAX_DEPTH", "JSONRequest", "check_json", "parse_json"]

#: Arrays and objects nested deeper than this are refused (no request needs more than a few).
MAX_DEPTH = 64

_UNSET: Any = object()


def parse_json(data: bytes) -> Any:
    """The JSON value in `data`, checked with `check_json`.

    Raises `BadRequest` saying what is wrong: not UTF-8, not JSON, nested too deeply,
    or a string holding a lone surrogate (naming where).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"Request body is not valid UTF-8 (byte {exc.start} is {data[exc.start]:#04x})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise BadRequest(f"Request body is nested too deeply (more than {MAX_DEPTH} levels)") from None
    except ValueError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}") from None
    check_json(value)
    return value


def check_json(value: Any) -> None:
    """Refuse JSON nested more than `MAX_DEPTH` levels or holding text that is not valid Unicode.

    Iterative, so no input can exhaust the stack.  Raises `BadRequest` naming the field
    (`messages.0.content`) of the first bad string.
    """
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, where or "body")
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise BadRequest(f"Request body is nested too deeply (more than {MAX_DEPTH} levels)")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                name = f"{where}.{key}" if where else str(key)
                if isinstance(key, str):
                    _check_text(key, f"{name} (a key)")
                stack.append((child, name, depth + 1))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise BadRequest(
            f"{where}: text is not valid Unicode (it holds a lone surrogate \\u{ord(bad):04x})"
        ) from None


class JSONRequest(TrioRequest):
    """A request whose `get_json` parses the body with `parse_json`, whatever its Content-Type
    (the app refuses write requests that are not `application/json` before this runs)."""

    _zenow_json: Any = _UNSET

    async def get_json(self, force: bool = True, silent: bool = False, cache: bool = True) -> Any:
        if self._zenow_json is not _UNSET:
            return self._zenow_json
        data = await self.get_data(cache=True, as_text=False)
        try:
            value = parse_json(data if isinstance(data, bytes) else data.encode())
        except BadRequest:
            if silent:
                return None
            raise
        self._zenow_json = value
        return value

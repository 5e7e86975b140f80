"""Reading the response headers a resumable download depends on.  Trio-free."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ContentRange", "content_length", "parse_content_range"]

_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE | re.ASCII)
_UNSATISFIED = re.compile(r"^\s*bytes\s+\*\s*/\s*(\d+)\s*$", re.IGNORECASE | re.ASCII)


@dataclass(frozen=True, slots=True)
class ContentRange:
    """`Content-Range: bytes first-last/complete`; `first`/`last` are None for `bytes */complete` (a 416)."""

    first: int | None
    last: int | None
    #: Size of the whole file; None when the server wrote `*`.
    complete: int | None


def parse_content_range(value: str | None) -> ContentRange | None:
    """The parsed header, or None when it is missing or malformed (an inconsistent range too)."""
    if value is None:
        return None
    match = _RANGE.match(value)
    if match:
        first, last = int(match.group(1)), int(match.group(2))
        complete = None if match.group(3) == "*" else int(match.group(3))
        if last < first or (complete is not None and last >= complete):
            return None
        return ContentRange(first, last, complete)
    match = _UNSATISFIED.match(value)
    if match:
        return ContentRange(None, None, int(match.group(1)))
    return None


def content_length(headers: Mapping[str, str]) -> int | None:
    """The body size the response announces, or None when it does not (or lies about its encoding).

    A body with a `Content-Encoding` other than identity has a length that is not the
    file's, so it counts as unknown.
    """
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        return None
    raw = headers.get("content-length")
    if raw is None or not (raw.strip().isascii() and raw.strip().isdigit()):
        return None  # "²".isdigit(), but int("²") fails
    return int(raw.strip())

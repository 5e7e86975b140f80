"""The `data:` lines of a Server-Sent Events stream, split from its bytes as they arrive (trio-free).

Both streams zenow reads from a mode's server, `/api/chat`'s and `/v1/chat/completions`',
read the response's raw bytes (asked for uncompressed) and split them here: one
`bytes.split` a read, no text decoding, and at most one incomplete line kept, up to
`MAX_LINE` bytes, so a server that never ends a line cannot grow zenow's memory.  A slow
stream's tokens arrive a read each, a fast one's several a read (`zenow.servers.batched_reads`).
Both pass a content's JSON string on undecoded, and decode a reply's text once, at its end
(`decode_literal`).
"""

from __future__ import annotations

import json

__all__ = ["JSON_STRING", "MAX_LINE", "DataLines", "MalformedStream", "decode_literal"]

#: The longest line a server may send (llama-server's last chunk, with usage and timings, is < 1 KiB).
MAX_LINE = 1 << 20
#: A JSON string literal in a payload's bytes, quotes and escapes included: the piece the patterns
#: that read llama-server's usual chunk without decoding it are built of (`zenow.chat`, `zenow.v1`).
JSON_STRING = rb'"(?:[^"\\]|\\.)*"'


class MalformedStream(ValueError):
    """The server sent something that is not the event stream expected."""


class DataLines:
    """Feed it the stream's bytes as they come; it returns the `data:` payloads each piece completes."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads (after `data:`, stripped) of the lines `data` completes, in order; the
        blank lines between events, comments and other fields are left out.

        Raises `MalformedStream` when the incomplete line kept grows past `MAX_LINE`.
        """
        lines = (self._pending + data).split(b"\n") if self._pending else data.split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > MAX_LINE:
            raise MalformedStream(f"a line longer than {MAX_LINE} bytes")
        return [line[5:].strip() for line in lines if line.startswith(b"data:")]


def decode_literal(escaped: bytes) -> str:
    """The text of JSON string bodies (escaped, without their quotes) joined together; should
    they not be valid JSON after all, the bytes as UTF-8 with replacement characters."""
    try:
        return str(json.loads(b'"' + escaped + b'"'))
    except ValueError:
        return escaped.decode("utf-8", "replace")

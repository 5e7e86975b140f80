"""Reading llama-server's streamed chat completion (trio-free).

llama-server sends one SSE event per token.  Nearly all of them have one shape, a
content delta with nothing else of interest; `ReplyReader` recognises that shape on the
raw bytes and passes the JSON string of the content through, untouched, into the
event zenow sends (`Delta.frame`): no JSON decoding and re-encoding per token.  Any
other event (the role chunk, the last chunks with `finish_reason` and `usage`, an
error, a shape some other build sends) is decoded as JSON.  The reply's text is
decoded once, at the end (`decode_literal`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..event_stream import JSON_STRING as _STRING
from ..event_stream import DataLines, MalformedStream, decode_literal

__all__ = ["MalformedStream", "ReplyReader", "UpstreamFailed", "decode_literal", "delta_frame"]

#: A content delta and nothing else: llama-server's usual chunk, keys in the order it writes them.
_CONTENT_CHUNK = re.compile(
    rb'\{"choices":\[\{"finish_reason":null,"index":0,"delta":\{"content":(' + _STRING + rb')\}\}\]'
    rb'(?:,"(?:created|id|model|system_fingerprint|object)":(?:' + _STRING + rb'|\d+))*\}',
    re.DOTALL,
)
_FRAME_START = b'data: {"choices":[{"delta":{"content":'
_FRAME_END = b"}}]}\n\n"


class UpstreamFailed(Exception):
    """llama-server reported an error inside the stream."""


def delta_frame(literal: bytes) -> bytes:
    """The SSE event zenow sends for one delta whose content is the JSON string `literal` (quotes included)."""
    return _FRAME_START + literal + _FRAME_END


@dataclass
class ReplyReader:
    """Feed it the stream's bytes as they come; it returns the deltas each piece completes.

    It keeps at most one incomplete line (`DataLines`).
    """

    #: Set once `data: [DONE]` was read (anything after it is ignored).
    done: bool = False
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    #: How many deltas with content were read.
    deltas: int = 0
    _lines: DataLines = field(default_factory=DataLines, repr=False)

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """The SSE events to send for the deltas completed by `data`, and their contents as
        JSON string bodies joined together (both empty when none completed).

        Raises `UpstreamFailed` (an error event) or `MalformedStream`.
        """
        if self.done:
            return b"", b""
        frames: list[bytes] = []
        literals: list[bytes] = []
        for payload in self._lines.feed(data):
            if payload == b"[DONE]":
                self.done = True
                break
            match = _CONTENT_CHUNK.fullmatch(payload)
            if match is not None:
                literal = match.group(1)
                if len(literal) > 2:
                    frames.append(delta_frame(literal))
                    literals.append(literal[1:-1])
                    self.deltas += 1
                continue
            for content in self._decode(payload):
                literal = json.dumps(content, ensure_ascii=False).encode()
                frames.append(delta_frame(literal))
                literals.append(literal[1:-1])
                self.deltas += 1
        return b"".join(frames), b"".join(literals)

    def _decode(self, payload: bytes) -> list[str]:
        """The contents of a chunk read as JSON; notes its finish reason and usage."""
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise MalformedStream(str(exc)) from None
        if not isinstance(chunk, dict):
            raise MalformedStream(f"a chunk that is not an object: {payload[:200]!r}")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise UpstreamFailed(str(message))
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        contents: list[str] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                contents.append(content)
        return contents

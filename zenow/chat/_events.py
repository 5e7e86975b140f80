"""What the chat streamer sends a route, one item at a time, and how a route frames it as SSE."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ._upstream import decode_literal, delta_frame

__all__ = ["DONE", "Delta", "Failed", "Finished", "StreamEvent", "sse"]


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the assistant's reply: one or more of llama-server's deltas, as they arrived.

    `frame` holds the SSE events to send, whole, one per upstream delta; `literal` their
    contents as JSON string bodies (escaped, unquoted) joined together.  Several deltas
    travel as one when the reader lags behind llama-server, so a slow client gets fewer,
    larger writes and never half an event.
    """

    frame: bytes
    literal: bytes

    @property
    def content(self) -> str:
        """The text of this piece of the reply (decoded on each call)."""
        return decode_literal(self.literal)

    @classmethod
    def of(cls, content: str) -> Delta:
        """The delta carrying `content`."""
        literal = json.dumps(content, ensure_ascii=False).encode()
        return cls(delta_frame(literal), literal[1:-1])


@dataclass(frozen=True, slots=True)
class Finished:
    """Generation ended normally."""

    finish_reason: str | None
    usage: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Failed:
    """llama-server failed mid-stream; the partial reply was saved."""

    message: str


StreamEvent = Delta | Finished | Failed

DONE = b"data: [DONE]\n\n"


def sse(event: StreamEvent) -> bytes | None:
    """The SSE events for `event`, each complete with its blank line, as one chunk; None for
    events with no frame.

    A client that splits each read on newlines (the spec's own example) never sees
    half an event, because events are written whole.
    """
    if isinstance(event, Delta):
        return event.frame
    if isinstance(event, Failed):
        payload = {"error": event.message}
        return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
    return None

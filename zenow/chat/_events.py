"""What the chat streamer sends a route, one item at a time, and how a route frames it as SSE."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["DONE", "Delta", "Failed", "Finished", "StreamEvent", "sse"]


@dataclass(frozen=True, slots=True)
class Delta:
    """A piece of the assistant's reply."""

    content: str


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
    """One SSE event, complete with its blank line, as one chunk; None for events with no frame.

    A client that splits each read on newlines (the spec's own example) never sees
    half an event, because each event is written whole.
    """
    if isinstance(event, Delta):
        payload: dict[str, Any] = {"choices": [{"delta": {"content": event.content}}]}
    elif isinstance(event, Failed):
        payload = {"error": event.message}
    else:
        return None
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"

"""Reading a `/v1` conversation's next turn ahead, and keeping its next request off that read.

After a chat completion that ended well, llama-server reads what every next turn of the
conversation starts with into its cache (`zenow.servers.prefill`), as after an `/api/chat`
reply: the next turn computes only its own messages.  `/v1` has no session; the
conversation is the request's messages and the reply.  A request that goes on with one
(its messages up to its last assistant message are that conversation) and comes while its
read is in flight waits for the read: sent at once, it would find the slot holding the
conversation busy and go to another, computing the whole conversation again.  Requests
going on with no conversation being read never wait.

Only plain conversations are read ahead: every message a system, user or assistant one
with text content and nothing else, and no option that changes how the chat template
renders them (tools, template arguments).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from ..servers import ModelGate, prefill

__all__ = ["ReadAhead", "ReadAheads", "completion_reply", "ended_well", "plain_conversation"]

#: Options with which llama-server renders the messages otherwise than `/apply-template` does.
_TEMPLATE_OPTIONS = frozenset({"tools", "tool_choice", "functions", "function_call", "chat_template_kwargs"})
_PLAIN_ROLES = frozenset({"system", "user", "assistant"})
#: The finish reasons of a reply the conversation may go on from.
_ENDED_WELL = ("stop", "length")

#: A conversation as compared: each message's role and its text, stripped (a client may trim the reply).
_Key = tuple[tuple[str, str], ...]


def plain_conversation(options: Mapping[str, Any]) -> list[dict[str, str]] | None:
    """The messages of a chat completion's `options` when they may be read ahead (see the module
    docstring), else None."""
    if _TEMPLATE_OPTIONS.intersection(options):
        return None
    messages = options.get("messages")
    if not isinstance(messages, list):
        return None
    for message in messages:
        if (not isinstance(message, dict) or message.keys() != {"role", "content"}
                or message["role"] not in _PLAIN_ROLES or not isinstance(message["content"], str)):
            return None
    return messages


def completion_reply(answer: Mapping[str, Any]) -> str | None:
    """The reply of a whole chat completion (llama-server's answer) that ended well, else None."""
    try:
        (choice,) = answer["choices"]
        content = choice["message"]["content"]
        ended = choice["finish_reason"]
    except (KeyError, TypeError, ValueError):
        return None
    return content if isinstance(content, str) and ended_well(ended) else None


def ended_well(finish_reason: object) -> bool:
    """Whether a reply with `finish_reason` (as llama-server sent it: any JSON) is one the conversation
    may go on from."""
    return isinstance(finish_reason, str) and finish_reason in _ENDED_WELL


def _key(messages: list[dict[str, str]]) -> _Key:
    return tuple((m["role"], m["content"].strip()) for m in messages)


def _continued_key(messages: object) -> _Key | None:
    """The key of the conversation a request's `messages` go on with: up to its last assistant
    message; None when there is none, or the messages are not plain."""
    if not isinstance(messages, list):
        return None
    for end in range(len(messages) - 1, -1, -1):
        message = messages[end]
        if isinstance(message, dict) and message.get("role") == "assistant":
            head = messages[:end + 1]
            if all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in head):
                return _key(head)
            return None
    return None


class ReadAheads:
    """The reads ahead in flight, by conversation (the gateway holds one)."""

    def __init__(self) -> None:
        self._pending: dict[_Key, trio.Event] = {}

    async def wait_before(self, options: Mapping[str, Any]) -> None:
        """Return once no read ahead of the conversation the request `options` go on with is in
        flight: at once when none is (the usual case, and then the messages are not even looked at)."""
        if not self._pending:
            return
        key = _continued_key(options.get("messages"))
        done = self._pending.get(key) if key is not None else None
        if done is not None:
            await done.wait()

    def _begin(self, key: _Key) -> bool:
        if key in self._pending:  # the same conversation read already: once is enough
            return False
        self._pending[key] = trio.Event()
        return True

    def _end(self, key: _Key) -> None:
        self._pending.pop(key).set()


@dataclass(eq=False)
class ReadAhead:
    """One completion's read ahead: `ended(reply)` before its client is handed the end, `delivered`
    once it was, then `run` (or `drop`).  Made by the gateway for a plain conversation on zenow's own
    llama-server."""

    reads: ReadAheads
    gate: ModelGate
    endpoint: str
    headers: Mapping[str, str] = field(repr=False)
    messages: list[dict[str, str]] = field(repr=False)
    #: Set once the client was handed the reply's end (`run` reads nothing before).
    delivered: bool = field(default=False, init=False)
    _conversation: list[dict[str, str]] | None = field(default=None, init=False, repr=False)
    _key: _Key | None = field(default=None, init=False, repr=False)

    def ended(self, reply: str | None) -> bool:
        """The completion ended well with `reply`: from now on the conversation's next request waits
        for `run` (or `drop`).  Whether there is a read to run (not for an empty reply, nor for a
        conversation being read already)."""
        if not reply or self._key is not None:
            return False
        conversation = [*self.messages, {"role": "assistant", "content": reply}]
        key = _key(conversation)
        if not self.reads._begin(key):
            return False
        self._conversation, self._key = conversation, key
        return True

    async def run(self, http: httpx.AsyncClient) -> None:
        """Read the next turn's start into llama-server's cache, when `ended` and `delivered` and the model
        has a slot to spare (the caller still holds its lease); at most `zenow.servers.PREFILL_DEADLINE`
        seconds.  Then `drop`, whatever happened.  Never raises but for cancellation."""
        try:
            if self._conversation is not None and self.delivered and self.gate.a_slot_to_spare():
                await prefill(http, self.endpoint, self.headers, self._conversation)
        finally:
            self.drop()

    def drop(self) -> None:
        """Give the read up (or mark it over): the next request goes on at once."""
        key, self._key, self._conversation = self._key, None, None
        if key is not None:
            self.reads._end(key)

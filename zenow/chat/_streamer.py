"""The chat streamer: builds prompts, streams replies from the llm server, saves turns.

`ChatStreamer.open(request)` checks everything that can be refused (session, server,
context window) and only then hands back a `ChatStream`: a receive channel of
`Delta` / `Finished` / `Failed` events fed by a task in the streamer's nursery.
The checks run in that per-request task too (they read the session and count tokens
with the model's tokenizer, one HTTP call per message), so the streamer's mailbox
only starts tasks and chats on different sessions never wait for each other.  The
task holds the session's lock from storing the user's messages until the
assistant's reply is saved, so two chats on one session never interleave.

When the consumer goes away it calls `ChatStream.cancel()`: the upstream request
to llama-server is closed at once (generation stops, the slot is freed) and the
partial reply is saved.  When llama-server fails mid-stream the consumer gets
`Failed` and the partial reply is saved too.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import outcome
import trio

from ..actor import Actor, ActorRef
from ..errors import (
    ActorCrashed,
    ActorUnavailable,
    ContextOverflow,
    ModelNotLoaded,
    ServerNotRunning,
    TooManyStreams,
    UpstreamError,
    ZenowError,
)
from ..servers import ServerHandle, ServerStatus, child_auth
from ..store import Store
from ..tokens import TokenCounter
from ._events import Delta, Failed, Finished, StreamEvent
from ._prompt import Turn, history_within

__all__ = ["ChatRequest", "ChatResult", "ChatStream", "ChatStreamer", "ChatStreamerActor"]

log = logging.getLogger(__name__)

NOT_RUNNING = "LLM server is not running. Please select a model first."
EVENT_BUFFER = 32
HISTORY_PAGE = 200


@dataclass(frozen=True)
class ChatRequest:
    session_id: int
    messages: list[tuple[str, str]]  # (role, content), validated by the route
    temperature: float | None = None
    repeat_penalty: float | None = None
    max_tokens: int | None = None


@dataclass
class ChatStream:
    """What a consumer reads; `cancel()` stops generation upstream at once."""

    events: trio.MemoryReceiveChannel[StreamEvent]
    scope: trio.CancelScope
    #: Called once when the stream ends (its slot among the open streams is free again).
    on_end: Callable[[], None] | None = None

    def cancel(self) -> None:
        self.scope.cancel()
        self.events.close()
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()


@dataclass(frozen=True)
class ChatResult:
    content: str
    finish_reason: str | None
    usage: dict[str, Any] | None


@dataclass
class _Prepared:
    request: ChatRequest
    system: Turn | None
    turns: list[Turn]
    context_size: int
    options: dict[str, Any]


class ChatStreamerActor(Actor):
    def __init__(self, store: Store, llm: ServerHandle, tokens: TokenCounter,
                 read_timeout: float = 600.0) -> None:
        self.store = store
        self.llm = llm
        self.tokens = tokens
        self._locks: dict[int, tuple[trio.Lock, int]] = {}
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=read_timeout), trust_env=False, auth=child_auth(),
            limits=httpx.Limits(max_keepalive_connections=4),
        )

    async def teardown(self) -> None:
        await self._http.aclose()

    async def open(self, request: ChatRequest, send: trio.MemorySendChannel[StreamEvent],
                   scope: trio.CancelScope, ready: trio.MemorySendChannel[outcome.Outcome[None]]) -> None:
        """Start a task for `request`: it refuses what must be refused, then generates into
        `send` under `scope`.

        The task answers on `ready` first: an error (`SessionNotFound`, `ServerNotRunning`,
        `ContextOverflow` with the counts; then nothing was stored and `send` is closed) or
        a value once it goes on to generate.  When nobody receives that answer any more
        (the caller went away), it stops there, having stored nothing.
        """
        self.nursery.start_soon(self._chat, request, send, scope, ready)

    async def _chat(self, request: ChatRequest, send: trio.MemorySendChannel[StreamEvent],
                    scope: trio.CancelScope, ready: trio.MemorySendChannel[outcome.Outcome[None]]) -> None:
        async with ready:
            try:
                prepared = await self._prepare(request)
            except ZenowError as exc:
                send.close()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    ready.send_nowait(outcome.Error(exc))
                return
            except Exception as exc:
                send.close()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    ready.send_nowait(outcome.Error(ActorCrashed(
                        f"Internal error in ChatStreamerActor: {type(exc).__name__}: {exc}")))
                raise  # a bug: the actor restarts
            try:
                ready.send_nowait(outcome.Value(None))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                send.close()
                return  # the caller is gone: start nothing
        await self._generate(prepared, send, scope)

    async def _prepare(self, request: ChatRequest) -> _Prepared:
        await self.store.get_session(request.session_id)
        status = self.llm.status()
        if status.endpoint is None:
            raise ServerNotRunning(NOT_RUNNING)
        params = self.llm.parameters()
        system_prompt = params.get("system_prompt") or ""
        system = Turn("system", system_prompt, await self.tokens.count(system_prompt)) if system_prompt else None
        turns = [Turn(role, content, await self.tokens.count(content)) for role, content in request.messages]
        # what the running server has: context_size, or less for a model trained for less
        context_size = status.context_size or int(params["context_size"])
        system_tokens = system.token_count if system else 0
        needed = system_tokens + sum(t.token_count for t in turns)
        if needed > context_size:
            raise ContextOverflow(
                f"messages: the request needs {needed} tokens (system prompt {system_tokens} + "
                f"messages {needed - system_tokens}), more than the context window of {context_size} tokens"
            )
        max_tokens = request.max_tokens if request.max_tokens is not None else params["max_tokens"]
        options = {
            "temperature": request.temperature if request.temperature is not None else params["temperature"],
            "repeat_penalty": request.repeat_penalty if request.repeat_penalty is not None
            else params["repeat_penalty"],
            # never more than the window holds (llama-server takes a huge count as a negative one)
            "max_tokens": min(int(max_tokens), context_size),
        }
        return _Prepared(request, system, turns, context_size, options)

    def _lock_for(self, session_id: int) -> trio.Lock:
        lock, users = self._locks.get(session_id, (trio.Lock(), 0))
        self._locks[session_id] = (lock, users + 1)
        return lock

    def _release(self, session_id: int) -> None:
        lock, users = self._locks[session_id]
        if users <= 1:
            del self._locks[session_id]
        else:
            self._locks[session_id] = (lock, users - 1)

    async def _history(self, session_id: int, before_id: int, budget: int) -> list[Turn]:
        newest_first: list[Turn] = []
        used = 0
        cursor = before_id
        while used <= budget:
            page = await self.store.newest_messages(session_id, cursor, HISTORY_PAGE)
            if not page:
                break
            for message in page:
                newest_first.append(Turn(message.role, message.content, message.token_count))
                used += message.token_count
            cursor = page[-1].id
        return history_within(budget, newest_first)

    async def _generate(self, prepared: _Prepared, send: trio.MemorySendChannel[StreamEvent],
                        scope: trio.CancelScope) -> None:
        request = prepared.request
        lock = self._lock_for(request.session_id)
        parts: list[str] = []
        try:
            async with send, lock:
                try:
                    # A lease on the running model, taken under the session lock (it may have
                    # restarted meanwhile): a /v1 request switching the llm model waits for it.
                    try:
                        status, lease = await self.llm.gate.enter(None)
                    except ModelNotLoaded:
                        raise ServerNotRunning(NOT_RUNNING) from None
                except ZenowError as exc:
                    with trio.move_on_after(1):
                        await send.send(Failed(str(exc)))
                    return
                try:
                    await self._generate_leased(prepared, status, send, scope, parts)
                finally:
                    lease.release()
        finally:
            self._release(request.session_id)

    async def _generate_leased(self, prepared: _Prepared, status: ServerStatus,
                               send: trio.MemorySendChannel[StreamEvent], scope: trio.CancelScope,
                               parts: list[str]) -> None:
        """Store the request, stream the reply from `status`'s server into `send`, save it."""
        request = prepared.request
        endpoint = status.endpoint
        try:
            if endpoint is None:  # the gate hands out running models only
                raise ServerNotRunning(NOT_RUNNING)
            messages = await self._store_and_build(prepared)
        except ZenowError as exc:
            with trio.move_on_after(1):
                await send.send(Failed(str(exc)))
            return
        closing: StreamEvent | None = None
        try:
            with scope:
                closing = await self._stream_upstream(endpoint, prepared, messages, parts, send)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the consumer went away; the upstream request is closed by now
        finally:
            with trio.CancelScope(shield=True):
                await self._save_reply(request.session_id, "".join(parts))
        if closing is not None:  # sent after the save: a client that saw the end finds the reply stored
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await send.send(closing)

    async def _store_and_build(self, prepared: _Prepared) -> list[Turn]:
        """Store the request's messages, then return the whole prompt: system, history, request."""
        request = prepared.request
        first_id = None
        for turn in prepared.turns:
            saved = await self.store.add_message(request.session_id, turn.role, turn.content, turn.token_count)
            first_id = first_id if first_id is not None else saved.id
        system_cost = prepared.system.token_count if prepared.system else 0
        budget = prepared.context_size // 2 - system_cost
        history = await self._history(request.session_id, first_id or 0, budget)
        return ([prepared.system] if prepared.system else []) + history + prepared.turns

    async def _stream_upstream(self, endpoint: str, prepared: _Prepared, messages: list[Turn], parts: list[str],
                               send: trio.MemorySendChannel[StreamEvent]) -> StreamEvent:
        """Forward llama-server's deltas to `send`; return the closing event."""
        payload = {
            "messages": [{"role": t.role, "content": t.content} for t in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            **prepared.options,
        }
        finish_reason: str | None = None
        usage: dict[str, Any] | None = None
        try:
            async with self._http.stream("POST", f"{endpoint}/v1/chat/completions", json=payload) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode(errors="replace")
                    return Failed(f"llama-server answered {response.status_code}: {_error_message(body)}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:].strip()
                    if data == "[DONE]":
                        return Finished(finish_reason, usage)
                    chunk = json.loads(data)
                    if "error" in chunk:
                        return Failed(f"llama-server failed: {_error_message(json.dumps(chunk))}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        finish_reason = choice.get("finish_reason") or finish_reason
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            parts.append(content)
                            await send.send(Delta(content))
                return Failed("llama-server ended the stream without [DONE]")
        except httpx.HTTPError as exc:
            return Failed(f"llama-server connection failed: {exc.__class__.__name__}: {exc}".rstrip(": "))
        except json.JSONDecodeError as exc:
            return Failed(f"llama-server sent malformed data: {exc}")

    async def _save_reply(self, session_id: int, content: str) -> None:
        if not content:
            return
        try:
            tokens = await self.tokens.count(content)
            await self.store.add_message(session_id, "assistant", content, tokens)
        except Exception:  # never lose the stream over the save; say so loudly
            log.exception("could not save the assistant reply of session %d", session_id)


def _error_message(body: str) -> str:
    try:
        parsed = json.loads(body)
        error = parsed.get("error", parsed)
        return str(error.get("message", error) if isinstance(error, dict) else error)
    except (ValueError, AttributeError):
        return body.strip()[:500]


class ChatStreamer:
    """The chat streamer's handle; at most `max_streams` chats generate at once."""

    def __init__(self, ref: ActorRef[ChatStreamerActor], max_streams: int = 64) -> None:
        self._ref = ref
        self._max_streams = max_streams
        self._open = 0

    def _ended(self) -> None:
        self._open -= 1

    async def open(self, request: ChatRequest) -> ChatStream:
        """Start a reply; the caller must read the stream to its end or `cancel()` it.

        Raises `TooManyStreams` when `max_streams` chats are open already, and
        `SessionNotFound`, `ServerNotRunning` or `ContextOverflow`, before anything is
        stored.  Cancelling the call stops the generation it may have started.
        """
        if self._open >= self._max_streams:
            raise TooManyStreams(
                f"{self._open} chats are being answered already, the most zenow serves at once "
                f"(--max-chat-streams); try again when one has finished"
            )
        send, receive = trio.open_memory_channel[StreamEvent](EVENT_BUFFER)
        self._open += 1
        stream = ChatStream(receive, trio.CancelScope(), self._ended)
        ready_send, ready_receive = trio.open_memory_channel[outcome.Outcome[None]](1)
        try:
            with ready_receive:
                await self._ref.call(ChatStreamerActor.open, request, send, stream.scope, ready_send)
                try:
                    answer = await ready_receive.receive()
                except trio.EndOfChannel:
                    raise ActorUnavailable("The chat streamer stopped while preparing the chat") from None
            answer.unwrap()
        except BaseException:
            stream.cancel()
            send.close()
            ready_send.close()
            raise
        return stream

    async def complete(self, request: ChatRequest) -> ChatResult:
        """Generate a whole reply.  Raises what `open` raises, or `UpstreamError`."""
        stream = await self.open(request)
        parts: list[str] = []
        try:
            async for event in stream.events:
                if isinstance(event, Delta):
                    parts.append(event.content)
                elif isinstance(event, Failed):
                    raise UpstreamError(event.message)
                else:
                    return ChatResult("".join(parts), event.finish_reason, event.usage)
        finally:
            stream.cancel()
        raise UpstreamError("the reply ended without an end")

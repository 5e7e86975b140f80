"""The chat streamer: builds prompts, streams replies from the llm server, saves turns.

`ChatStreamer.open(request)` checks everything that can be refused (session, server,
context window) and only then hands back a `ChatStream`: a receive channel of
`Delta` / `Finished` / `Failed` events fed by a task in the streamer's nursery.
The checks run in that per-request task too, so the streamer's mailbox only starts
tasks and chats on different sessions never wait for each other.  The task holds the
session's lock from reading the history until the assistant's reply is saved, so two
chats on one session never interleave; chats on different sessions generate at once
in the llm server's parallel slots.

Before the first token: one read of the session with its newest page of messages
(it must exist; its token total anchors the history, see `_prompt.history_in_steps`;
that page is often the whole history sent, else more pages follow), at most one
`/tokenize` call (none once the system prompt's count is known and the request surely
fits the context: a token covers at least one byte), then the request to llama-server.
The request's messages are counted and stored while the reply streams, always before
the reply is saved; the reply's count is llama-server's own `usage`.  Deltas pass from
llama-server to the consumer as bytes (`_upstream`).

After a reply that ended well, and once the client has its end, the streamer has llama-server read
the start of the session's next turn into its cache (`zenow.servers.prefill`), still under the session's lock:
the next turn on the session computes only its own message.  Not while other requests fill every
slot of the llm server: the prefill would hold them up.

When the consumer goes away it calls `ChatStream.cancel()`: the upstream request
to llama-server is closed at once (generation stops, the slot is freed) and the
partial reply is saved.  When llama-server fails mid-stream the consumer gets
`Failed` and the partial reply is saved too.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import outcome
import trio

from .. import metrics
from ..actor import Actor, ActorRef
from ..channels import receive_waiting, send_soon
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
from ..servers import STREAM_HEADERS, ServerHandle, ServerStatus, batched_reads, prefill, upstream_client
from ..settings import DEFAULT_STREAM_BATCH_WINDOW
from ..store import MessageInfo, Store
from ..tokens import estimate_tokens
from ._events import DONE, Delta, Failed, Finished, StreamEvent, sse
from ._prompt import Turn, history_in_steps
from ._upstream import MalformedStream, ReplyReader, UpstreamFailed, decode_literal

__all__ = ["ChatRequest", "ChatResult", "ChatStream", "ChatStreamer", "ChatStreamerActor"]

log = logging.getLogger(__name__)

NOT_RUNNING = "LLM server is not running. Please select a model first."
#: Deltas the streamer may read ahead of its consumer: llama-server is read while the consumer writes,
#: and the consumer sends every delta waiting as one write (`ChatStream.frames`), so a lagging client
#: or a busy zenow gets fewer, larger writes.  When the buffer is full, what llama-server sends
#: meanwhile waits in the socket and comes as one larger delta (backpressure reaches llama-server).
EVENT_BUFFER = 8
HISTORY_PAGE = 200
#: Tokens the checks leave for special tokens a text may map to without covering a byte each.
SPECIAL_TOKENS_MARGIN = 8
#: Seconds the request's messages may take to be counted and stored once generation began.
STORE_DEADLINE = 30.0
#: Seconds the request's messages wait, once the first token came, for its delivery to the client.
DELIVERY_WAIT = 0.05


@dataclass(frozen=True)
class ChatRequest:
    session_id: int
    messages: list[tuple[str, str]]  # (role, content), validated by the route
    temperature: float | None = None
    repeat_penalty: float | None = None
    max_tokens: int | None = None
    #: When the request arrived (trio's clock): its time to first token is counted from here.
    received_at: float = field(default_factory=trio.current_time)
    #: Set by the reply's consumer once it has handed the first delta on (or stopped): the
    #: request's messages are counted and stored after that, not while the first token travels.
    delivered: trio.Event = field(default_factory=trio.Event, compare=False, repr=False)


@dataclass
class ChatStream:
    """What a consumer reads; `cancel()` stops generation upstream at once."""

    events: trio.MemoryReceiveChannel[StreamEvent]
    scope: trio.CancelScope
    #: Called once when the stream ends (its slot among the open streams is free again).
    on_end: Callable[[], None] | None = None
    #: Set once the first delta was handed on (the request's `delivered`).
    delivered: trio.Event = field(default_factory=trio.Event)

    async def frames(self) -> AsyncIterator[bytes]:
        """The reply as SSE, ending with `data: [DONE]`: each chunk holds whole events, every
        event already waiting when one arrives (a lagging reader gets fewer, larger chunks)."""
        async for event in self.events:
            frames = [sse(waiting) for waiting in receive_waiting(event, self.events)]
            chunk = b"".join(frame for frame in frames if frame is not None)
            if chunk:
                yield chunk  # back here once the consumer wrote it
                self.delivered.set()
        yield DONE

    def cancel(self) -> None:
        self.delivered.set()
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
    #: The server the counts were made with.
    endpoint: str
    system: Turn | None
    #: Token counts of the request's messages; None when they are counted while the reply streams.
    counts: list[int] | None
    context_size: int
    options: dict[str, Any]
    #: The session's stored tokens when it was read (the history's end offset).
    session_tokens: int
    #: The session's newest messages read with it (newest first, at most `HISTORY_PAGE`).
    newest: list[MessageInfo]


@dataclass(eq=False)
class _SessionChats:
    """The chats on one session that the streamer is answering or about to."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    #: Chats counted on the session now.
    users: int = 0
    #: Chats ever counted on it while this entry lived.
    joined: int = 0


class ChatStreamerActor(Actor):
    """Answers chats: each in a task of its own (see the module docstring); tokens are
    counted with one batched `/tokenize` call per chat."""

    def __init__(self, store: Store, llm: ServerHandle, read_timeout: float = 600.0,
                 batch_window: float = DEFAULT_STREAM_BATCH_WINDOW, prefill_next_turn: bool = True) -> None:
        self.store = store
        self.llm = llm
        self._batch_window = batch_window
        self._prefill_next_turn = prefill_next_turn
        self._sessions: dict[int, _SessionChats] = {}
        #: (endpoint, system prompt, its token count): the one count every chat needs.
        self._system_count: tuple[str, str, int] | None = None
        self._http = upstream_client(httpx.Timeout(10.0, read=read_timeout), keepalive_connections=16)

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
        # counted on its session before the session is read: another chat on it that starts or
        # runs meanwhile is seen, and the history is read again under the lock (`_generate`)
        chats = self._join(request.session_id)
        # the llm server is in use from now on, not only once the lease is taken: an idle stop
        # between the wake in `_prepare` and the lease would make this chat start it twice
        activity = self.llm.activity
        activity.begin()
        try:
            await self._chat_joined(request, chats, send, scope, ready)
        finally:
            activity.end()
            self._leave(request.session_id)

    async def _chat_joined(self, request: ChatRequest, chats: _SessionChats,
                           send: trio.MemorySendChannel[StreamEvent], scope: trio.CancelScope,
                           ready: trio.MemorySendChannel[outcome.Outcome[None]]) -> None:
        first, joined_then = chats.users == 1, chats.joined
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
        # another chat on the session, there before this one or come since, may have changed it unseen
        await self._generate(prepared, chats, send, scope, reread=not first or chats.joined != joined_then)

    async def _prepare(self, request: ChatRequest) -> _Prepared:
        """Check the session, the server and the context window; count what must be counted now."""
        # the session and the start of its history in one store call: often all the history sent
        session, newest = await self.store.session_with_newest_messages(request.session_id, HISTORY_PAGE)
        status = await self.llm.wake()  # an llm server stopped for idleness starts again; the chat waits
        endpoint = status.endpoint
        if endpoint is None:
            raise status.not_running(NOT_RUNNING)
        params = self.llm.parameters()
        system_prompt = params.get("system_prompt") or ""
        # what the running server has per conversation: context_size, or less for a model trained for less
        context_size = status.context_size or int(params["context_size"])
        contents = [content for _, content in request.messages]
        system_tokens = self._known_system_count(endpoint, system_prompt)
        counts: list[int] | None = None
        if system_tokens is None:
            counted = await self._count(status, [system_prompt, *contents])
            system_tokens, counts = counted[0], counted[1:]
            self._system_count = (endpoint, system_prompt, system_tokens)
        elif not _surely_fits(contents, context_size - system_tokens):
            counts = await self._count(status, contents)
        if counts is not None:
            needed = system_tokens + sum(counts)
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
        if status.backend_url is not None and status.model_name:  # a farm needs to be told which model
            options["model"] = status.model_name
        system = Turn("system", system_prompt, system_tokens) if system_prompt else None
        return _Prepared(request, endpoint, system, counts, context_size, options, session.total_tokens, newest)

    def _known_system_count(self, endpoint: str, system_prompt: str) -> int | None:
        if not system_prompt:
            return 0
        known = self._system_count
        if known is not None and known[0] == endpoint and known[1] == system_prompt:
            return known[2]
        return None

    async def _count(self, server: ServerStatus, texts: list[str]) -> list[int]:
        """The token count of each of `texts` with the running model's tokenizer, in one
        `/tokenize` call (texts separated by the impossible token id -1); estimates when
        llama-server does not answer, or the server has no `/tokenize`.  Never raises."""
        if not any(texts):
            return [0] * len(texts)
        if server.token_counting == "estimate":
            return [estimate_tokens(text) for text in texts]
        content: str | list[str | int] = texts[0] if len(texts) == 1 else _interleave(texts)
        try:
            response = await self._http.post(f"{server.endpoint}/tokenize", json={"content": content},
                                             headers=server.auth_headers())
            response.raise_for_status()
            tokens = response.json()["tokens"]
            counts = [0]
            for token in tokens:
                if token == -1:
                    counts.append(0)
                else:
                    counts[-1] += 1
            if len(counts) == len(texts):
                return counts
            log.warning("llama-server's /tokenize gave %d counts for %d texts; estimating", len(counts), len(texts))
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            log.warning("llama-server's /tokenize failed (%s); estimating token counts", exc)
        return [estimate_tokens(text) for text in texts]

    def _join(self, session_id: int) -> _SessionChats:
        """Count one more chat on the session (until `_leave`)."""
        chats = self._sessions.get(session_id)
        if chats is None:
            chats = self._sessions[session_id] = _SessionChats()
        chats.users += 1
        chats.joined += 1
        return chats

    def _leave(self, session_id: int) -> None:
        chats = self._sessions[session_id]
        chats.users -= 1
        if chats.users == 0:
            del self._sessions[session_id]

    async def _history(self, session_id: int, budget: int, end_offset: int,
                       first_page: list[MessageInfo] | None = None) -> list[Turn]:
        """The stored history to send (`history_in_steps`), read newest first a page at a time
        (the first page may be given: read with the session)."""
        newest_first: list[Turn] = []
        used = 0
        cursor: int | None = None
        while used <= budget:
            if first_page is not None:
                page, first_page = first_page, None
            else:
                page = await self.store.newest_messages(session_id, cursor, HISTORY_PAGE)
            for message in page:
                newest_first.append(Turn(message.role, message.content, message.token_count))
                used += message.token_count
            if len(page) < HISTORY_PAGE:
                break
            cursor = page[-1].id
        return history_in_steps(budget, end_offset, newest_first)

    async def _generate(self, prepared: _Prepared, chats: _SessionChats, send: trio.MemorySendChannel[StreamEvent],
                        scope: trio.CancelScope, *, reread: bool) -> None:
        """Generate under the session's lock; `reread`: the session may have changed since it was read."""
        async with send, chats.lock:
            try:
                # A lease on the running model, taken under the session lock (it may have
                # restarted meanwhile): a /v1 request switching the llm model waits for it.
                try:
                    status, lease = await self.llm.gate.enter(None)
                except ModelNotLoaded:
                    raise self.llm.status().not_running(NOT_RUNNING) from None
            except ZenowError as exc:
                with trio.move_on_after(1):
                    await send.send(Failed(str(exc)))
                return
            try:
                conversation = await self._generate_leased(prepared, status, send, scope, reread=reread)
                send.close()  # the client has the whole reply; the session's next chat waits for the prefill
                endpoint = status.endpoint
                if conversation is not None and endpoint is not None and self.llm.gate.a_slot_to_spare():
                    await prefill(self._http, endpoint, status.auth_headers(), conversation)
            finally:
                lease.release()

    async def _generate_leased(self, prepared: _Prepared, status: ServerStatus,
                               send: trio.MemorySendChannel[StreamEvent], scope: trio.CancelScope,
                               *, reread: bool) -> list[dict[str, str]] | None:
        """Read the history, stream the reply from `status`'s server into `send` while the
        request's messages are counted and stored, then save the reply.  Returns the
        conversation to prefill the next turn with (`zenow.servers.prefill`): the prompt and the reply,
        when the reply ended well and is stored and the server is zenow's own llama-server.

        `reread`: the session may have changed since `_prepare` read it (another chat on it).
        """
        request = prepared.request
        endpoint = status.endpoint
        try:
            if endpoint is None:  # the gate hands out running models only
                raise ServerNotRunning(NOT_RUNNING)
            session_tokens, newest = prepared.session_tokens, prepared.newest
            if reread:  # another chat on the session ran since it was read: read it again
                session, newest = await self.store.session_with_newest_messages(request.session_id, HISTORY_PAGE)
                session_tokens = session.total_tokens
            system_cost = prepared.system.token_count if prepared.system else 0
            history = await self._history(request.session_id, prepared.context_size // 2 - system_cost,
                                          session_tokens, newest)
        except ZenowError as exc:
            with trio.move_on_after(1):
                await send.send(Failed(str(exc)))
            return None
        messages = [*([prepared.system] if prepared.system else []), *history]
        prompt = [{"role": t.role, "content": t.content} for t in messages]
        prompt += [{"role": role, "content": content} for role, content in request.messages]
        reader = ReplyReader()
        parts: list[bytes] = []
        failures: list[ZenowError] = []
        closing: StreamEvent | None = None
        saved: str | None = None
        generating = trio.Event()
        try:
            async with trio.open_nursery() as storing:
                storing.start_soon(self._store_request, prepared, status, scope, failures, generating)
                try:
                    with scope:
                        closing = await self._stream_upstream(status, prepared, prompt, reader, parts, send,
                                                              generating)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the consumer went away; the upstream request is closed by now
                finally:
                    generating.set()
        finally:
            if not failures:  # the request is stored: its reply follows it
                with trio.CancelScope(shield=True):
                    saved = await self._save_reply(request.session_id, parts, reader)
        if failures:
            closing = Failed(str(failures[0]))
        if closing is not None:  # sent after the save: a client that saw the end finds the reply stored
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await send.send(closing)
        if (isinstance(closing, Finished) and saved is not None and self._prefill_next_turn
                and status.backend_url is None):
            return [*prompt, {"role": "assistant", "content": saved}]
        return None

    async def _store_request(self, prepared: _Prepared, server: ServerStatus, scope: trio.CancelScope,
                             failures: list[ZenowError], generating: trio.Event) -> None:
        """Once the first token came (or the stream ended), count (unless counted) and store the
        request's messages, whatever happens to the stream meanwhile; on failure note it in
        `failures` and stop the stream.  Waiting for the first token keeps the `/tokenize` call
        and the database writes off the CPU while llama-server reads the prompt, and waiting
        (briefly) for its delivery keeps them off the first token's way to the client."""
        await generating.wait()
        request = prepared.request
        with trio.move_on_after(DELIVERY_WAIT):
            await request.delivered.wait()
        with trio.CancelScope(shield=True), trio.move_on_after(STORE_DEADLINE) as deadline:
            try:
                counts = prepared.counts
                if counts is None:
                    counts = await self._count(server, [content for _, content in request.messages])
                for (role, content), count in zip(request.messages, counts, strict=True):
                    await self.store.add_message(request.session_id, role, content, count)
            except ZenowError as exc:
                failures.append(exc)
                scope.cancel()
        if deadline.cancelled_caught:
            failures.append(ZenowError(f"storing the request's messages took over {STORE_DEADLINE:g} s"))
            scope.cancel()

    async def _stream_upstream(self, server: ServerStatus, prepared: _Prepared, prompt: list[dict[str, str]],
                               reader: ReplyReader, parts: list[bytes],
                               send: trio.MemorySendChannel[StreamEvent], generating: trio.Event) -> StreamEvent:
        """Forward llama-server's deltas to `send` (whatever arrived in one read as one
        `Delta`), setting `generating` at the first; return the closing event."""
        payload = {
            "messages": prompt,
            "stream": True,
            "stream_options": {"include_usage": True},
            **prepared.options,
        }
        try:
            async with self._http.stream("POST", f"{server.endpoint}/v1/chat/completions", json=payload,
                                         headers={**server.auth_headers(), **STREAM_HEADERS}) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode(errors="replace")
                    return Failed(f"llama-server answered {response.status_code}: {_error_message(body)}")
                async with batched_reads(response, self._batch_window) as batching:
                    async for data in response.aiter_raw():  # uncompressed (STREAM_HEADERS)
                        batching.received(len(data))
                        frames, literal = reader.feed(data)
                        if frames:
                            generating.set()
                            metrics.first_delta(parts, prepared.request.received_at)
                            parts.append(literal)
                            await send_soon(send, Delta(frames, literal))
                        if reader.done:
                            return Finished(reader.finish_reason, reader.usage)
                return Failed("llama-server ended the stream without [DONE]")
        except httpx.HTTPError as exc:
            return Failed(f"llama-server connection failed: {exc.__class__.__name__}: {exc}".rstrip(": "))
        except UpstreamFailed as exc:
            return Failed(f"llama-server failed: {exc}")
        except MalformedStream as exc:
            return Failed(f"llama-server sent malformed data: {exc}")

    async def _save_reply(self, session_id: int, parts: list[bytes], reader: ReplyReader) -> str | None:
        """Store the reply streamed so far, counted by llama-server's `usage` (or one token a delta);
        the content stored, or None when there was none or it could not be stored."""
        if not parts:
            return None
        content = decode_literal(b"".join(parts))
        usage = reader.usage or {}
        tokens = usage.get("completion_tokens")
        if not isinstance(tokens, int) or tokens < 0:
            tokens = reader.deltas
        metrics.tokens_generated(tokens)
        try:
            await self.store.add_message(session_id, "assistant", content, tokens)
        except Exception:  # never lose the stream over the save; say so loudly
            log.exception("could not save the assistant reply of session %d", session_id)
            return None
        return content


def _surely_fits(texts: list[str], room: int) -> bool:
    """Whether `texts` take at most `room` tokens whatever the tokenizer: one token covers at
    least one UTF-8 byte, but for a few special tokens."""
    if room <= 0:
        return False
    length = sum(len(text) for text in texts)
    if 4 * length + SPECIAL_TOKENS_MARGIN * len(texts) <= room:  # no text is longer than 4 bytes a character
        return True
    if length + SPECIAL_TOKENS_MARGIN * len(texts) > room:
        return False
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    return size + SPECIAL_TOKENS_MARGIN * len(texts) <= room


def _interleave(texts: list[str]) -> list[str | int]:
    """`texts` with the token id -1 between them, for one `/tokenize` call that counts each."""
    content: list[str | int] = []
    for text in texts:
        if content:
            content.append(-1)
        content.append(text)
    return content


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

    @property
    def open_streams(self) -> int:
        """Chats being answered now."""
        return self._open

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
        stream = ChatStream(receive, trio.CancelScope(), self._ended, request.delivered)
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
        parts: list[bytes] = []
        try:
            async for event in stream.events:
                if isinstance(event, Delta):
                    parts.append(event.literal)
                    stream.delivered.set()
                elif isinstance(event, Failed):
                    raise UpstreamError(event.message)
                else:
                    return ChatResult(decode_literal(b"".join(parts)), event.finish_reason, event.usage)
        finally:
            stream.cancel()
        raise UpstreamError("the reply ended without an end")

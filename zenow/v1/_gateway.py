"""`OpenAIGateway`: what the `/v1` routes call.

It resolves the request's `model` against the registry (the route's mode only), takes
a lease on that model through the mode's `ModelGate` (loading it first when another
model runs), shapes the llama-server request, and has the upstream actor send it, with
the headers (the key) the mode's status gives.

A mode served by a remote backend (`backend_url`) has no registry of its own: the
request's `model` goes to the backend as it is (the backend's own model when absent),
and inputs are not cut to the model's context (the backend applies its own limits).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import outcome
import trio

from ..actor import ActorRef
from ..channels import receive_waiting
from ..errors import ActorUnavailable, InvalidRequest, ModelNotFound, UpstreamError
from ..servers import Lease, ServerHandle, ServerStatus
from ..settings import MODES, Mode, is_mode
from ..store import ModelInfo, Store
from ._actor import ChatStreamCall, UpstreamActor, UpstreamCall
from ._readahead import ReadAhead, ReadAheads, completion_reply, plain_conversation
from ._shapes import (
    DONE,
    ChatCompletionRequest,
    EmbeddingsRequest,
    ModelEntry,
    RerankRequest,
    chat_completion_response,
    embeddings_response,
    error_event,
    rerank_response,
    truncated_tokens,
    upstream_chat_payload,
)

__all__ = ["CompletionStream", "OpenAIGateway"]

#: How long a request naming another model waits for the requests the running one is answering.
#: Frames a stream buffers ahead of a slow client (backpressure reaches llama-server beyond it).
FRAME_BUFFER = 32
#: Texts with at most this many UTF-8 bytes fewer than the token limit are never tokenized to
#: check their length: a token covers at least one byte, apart from a few special tokens.
SPECIAL_TOKENS_MARGIN = 8

_ROUTES: dict[Mode, str] = {"llm": "/v1/chat/completions", "embed": "/v1/embeddings", "rerank": "/v1/rerank"}


@dataclass(frozen=True)
class _Target:
    """Where a request goes: the server's URL, the headers it needs (its key), whether it is remote."""

    url: str
    headers: dict[str, str] = field(repr=False)
    remote: bool

    @classmethod
    def of(cls, status: ServerStatus, endpoint: str) -> _Target:
        return cls(endpoint, status.auth_headers(), status.backend_url is not None)


@dataclass
class CompletionStream:
    """A streamed chat completion: whole SSE events ending with `data: [DONE]`.

    Read it with `async for frame in stream.frames()` to the end, or `cancel()` it: that
    closes the upstream request at once (generation stops, the slot is freed).
    """

    events: trio.MemoryReceiveChannel[bytes]
    scope: trio.CancelScope

    def cancel(self) -> None:
        self.scope.cancel()
        self.events.close()

    async def frames(self) -> AsyncIterator[bytes]:
        """The events, every one already waiting when one arrives in one chunk (a lagging reader
        gets fewer, larger chunks); if the stream stopped without `DONE` (zenow shutting down),
        an error event and `DONE` end it all the same."""
        async for frame in self.events:
            waiting = receive_waiting(frame, self.events)
            if DONE in waiting:  # nothing follows it
                yield b"".join(waiting[:waiting.index(DONE) + 1])
                return
            yield b"".join(waiting)
        yield error_event("the stream stopped before its end (zenow is stopping?)", "stream_interrupted")
        yield DONE


class OpenAIGateway:
    """The `/v1` front door (see the module docstring); routes hold one, built by the service."""

    def __init__(self, ref: ActorRef[UpstreamActor], store: Store, servers: Mapping[Mode, ServerHandle],
                 read_ahead: bool = True) -> None:
        self._ref = ref
        self._store = store
        self._servers = servers
        self._gates = {mode: servers[mode].gate for mode in MODES}
        #: Whether a chat completion's next turn is read ahead (`_readahead`); the reads in flight.
        self._read_ahead = read_ahead
        self._reads = ReadAheads()

    # ------------------------------------------------------------ models

    async def models(self) -> list[ModelEntry]:
        """Every registered model whose file exists, in registration order, with its mode
        and whether it is the one its mode runs.  Raises `StoreError`."""
        registered = [m for m in await self._store.list_models(None) if m.is_downloaded]
        created = await trio.to_thread.run_sync(_created_times, [m.path for m in registered])
        return [ModelEntry(m.name, m.mode, stamp, self._is_running(m)) for m, stamp in zip(registered, created,
                                                                                              strict=True)
                ] + self._remote_models()

    async def model(self, name: str, mode: Mode | None = None) -> ModelEntry:
        """The model `name`: of `mode` when given, else the first of llm, embed, rerank that
        has it (names are unique per mode only).  Raises `ModelNotFound`."""
        for entry in self._remote_models():
            if entry.name == name and mode in (None, entry.mode):
                return entry
        for candidate in (mode,) if mode is not None else MODES:
            model = await self._store.find_model(candidate, name)
            if model is not None and model.is_downloaded:
                (stamp,) = await trio.to_thread.run_sync(_created_times, [model.path])
                return ModelEntry(model.name, model.mode, stamp, self._is_running(model))
        where = f" for mode {mode}" if mode is not None else ""
        raise ModelNotFound(f"Model {name!r} not found{where}", param="model", code="model_not_found")

    def _is_running(self, model: ModelInfo) -> bool:
        if not is_mode(model.mode):
            return False
        status = self._servers[model.mode].status()
        return status.is_running and status.model_name == model.name and status.backend_url is None

    def _remote_models(self) -> list[ModelEntry]:
        """The model each mode served by a remote backend serves, when known."""
        found = []
        for mode in MODES:
            status = self._servers[mode].status()
            if status.backend_url is not None and status.model_name is not None:
                found.append(ModelEntry(status.model_name, mode, 0, status.is_running))
        return found

    # ------------------------------------------------------------ chat

    async def complete(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """A whole (non-streamed) chat completion from the llm model `request.model` (loaded
        first when another one runs), or from the running one.

        Raises `ModelNotFound` (unknown name), `InvalidRequest` (a model of another mode,
        or llama-server refused the request), `ModelNotLoaded`, `ModelBusy`,
        `ModelLoadFailed`, `UpstreamError`.  Cancelling it stops generation upstream.
        """
        await self._reads.wait_before(request.options)
        model_name, target, held = await self._enter("llm", request.model)
        lease: Lease | None = held
        try:
            payload = _for(target, model_name, upstream_chat_payload(request, self._servers["llm"].parameters()))
            answer = await self._call(UpstreamCall("POST", f"{target.url}/v1/chat/completions", payload, "messages",
                                                   target.headers))
            if not isinstance(answer, dict):
                raise UpstreamError("llama-server answered a chat completion that is not an object")
            read_ahead = self._read_ahead_of(request, target)
            if read_ahead is not None and read_ahead.ended(completion_reply(answer)):
                read_ahead.delivered = True  # as good as: the answer goes back from here
                try:  # the read holds the lease from here on
                    await self._ref.call(UpstreamActor.start_read_ahead, read_ahead, held.release)
                except BaseException:
                    read_ahead.drop()
                    raise
                lease = None
        finally:
            if lease is not None:
                lease.release()
        return chat_completion_response(answer, model_name)

    async def open_stream(self, request: ChatCompletionRequest) -> CompletionStream:
        """Start a streamed chat completion; returns once llama-server has accepted it.

        The caller must read the stream to its end or `cancel()` it.  Raises what
        `complete` raises, before anything was streamed; a failure later arrives as an
        error event.  Cancelling the call stops what it started.
        """
        await self._reads.wait_before(request.options)
        model_name, target, lease = await self._enter("llm", request.model)
        send, receive = trio.open_memory_channel[bytes](FRAME_BUFFER)
        started_send, started_receive = trio.open_memory_channel[outcome.Outcome[None]](1)
        stream = CompletionStream(receive, trio.CancelScope())
        try:
            payload = _for(target, model_name, upstream_chat_payload(request, self._servers["llm"].parameters()))
            call = ChatStreamCall(f"{target.url}/v1/chat/completions", payload, model_name, target.headers,
                                  self._read_ahead_of(request, target))
            await self._ref.call(UpstreamActor.start_stream, call, send, started_send, stream.scope, lease.release)
            with started_receive:
                try:
                    started = await started_receive.receive()
                except trio.EndOfChannel:
                    raise UpstreamError("the stream ended before llama-server answered",
                                        code="upstream_error") from None
            started.unwrap()
        except BaseException:
            stream.cancel()
            send.close()
            started_send.close()
            lease.release()
            raise
        return stream

    def _read_ahead_of(self, request: ChatCompletionRequest, target: _Target) -> ReadAhead | None:
        """The read ahead of the request's next turn, when there may be one: on zenow's own llama-server,
        for a plain conversation (`_readahead`)."""
        if not self._read_ahead or target.remote:
            return None
        messages = plain_conversation(request.options)
        if messages is None:
            return None
        return ReadAhead(self._reads, self._gates["llm"], target.url, target.headers, messages)

    # ------------------------------------------------------------ embeddings and rerank

    async def embeddings(self, request: EmbeddingsRequest) -> dict[str, Any]:
        """Embed every input with the embed model `request.model` (loaded first when another
        runs), or the running one; the mode's `normalize` (L2, or none) and `truncate` (cut
        over-long inputs to what the model takes in one batch, keeping its special tokens)
        parameters apply.

        Raises `ModelNotFound`, `InvalidRequest` (another mode's model; an input too long
        with `truncate` off: code `context_length_exceeded`), `ModelNotLoaded`,
        `ModelBusy`, `ModelLoadFailed`, `UpstreamError`.  Cancelling it stops the request.
        """
        params = self._servers["embed"].parameters()
        async with self._using("embed", request.model) as (target, model_name):
            inputs = request.inputs
            if params.get("truncate", True) and not target.remote:
                inputs = await self._truncated(target, inputs, params)
            payload = _for(target, model_name, {"input": inputs, "encoding_format": "float",
                                                "embd_normalize": 2 if params.get("normalize", True) else -1})
            answer = await self._call(UpstreamCall("POST", f"{target.url}/v1/embeddings", payload, "input",
                                                   target.headers))
        if not isinstance(answer, dict):
            raise UpstreamError("llama-server answered embeddings that are not an object")
        return embeddings_response(answer, model_name, request.encoding_format, len(inputs))

    async def rerank(self, request: RerankRequest) -> dict[str, Any]:
        """Score every document against the query with the rerank model `request.model`
        (loaded first when another runs), or the running one; best first, cut to `top_n`.

        Raises what `embeddings` raises (a too long document names `documents`).
        """
        async with self._using("rerank", request.model) as (target, model_name):
            payload = _for(target, model_name, {"query": request.query, "documents": request.documents})
            answer = await self._call(UpstreamCall("POST", f"{target.url}/v1/rerank", payload, "documents",
                                                   target.headers))
        if not isinstance(answer, dict):
            raise UpstreamError("llama-server answered rerank that is not an object")
        return rerank_response(answer, request, model_name)

    async def _truncated(self, target: _Target, inputs: list[str | list[int]],
                         params: Mapping[str, Any]) -> list[str | list[int]]:
        """`inputs` with each one longer than the model takes cut to its token limit (a text
        becomes its token ids).  Only texts that may be too long are tokenized."""
        limit = int(params.get("batch_size", 512))
        if "context_size" in params:
            limit = min(limit, int(params["context_size"]))
        if all(len(x.encode()) + SPECIAL_TOKENS_MARGIN <= limit if isinstance(x, str) else len(x) <= limit
               for x in inputs):
            return inputs
        limit = min(limit, await self._context_limit(target))
        cut: list[str | list[int]] = []
        for item in inputs:
            if isinstance(item, list):
                cut.append(item[:limit])
            elif len(item.encode()) + SPECIAL_TOKENS_MARGIN <= limit:
                cut.append(item)
            else:
                full = await self._tokens(target, item, special=True)
                if len(full) <= limit:
                    cut.append(item)
                else:
                    cut.append(truncated_tokens(full, await self._tokens(target, item, special=False), limit))
        return cut

    async def _context_limit(self, target: _Target) -> int:
        """The fewest tokens of the served context and the model's trained context
        (llama-server's /v1/models `meta`); a large number when it does not say."""
        answer = await self._call(UpstreamCall("GET", f"{target.url}/v1/models", headers=target.headers))
        limits = [2**31]
        try:
            meta = answer["data"][0]["meta"]
            limits += [int(meta[key]) for key in ("n_ctx", "n_ctx_train") if int(meta.get(key) or 0) > 0]
        except (KeyError, IndexError, TypeError, ValueError):
            pass
        return min(limits)

    async def _tokens(self, target: _Target, text: str, *, special: bool) -> list[int]:
        answer = await self._call(UpstreamCall("POST", f"{target.url}/tokenize",
                                               {"content": text, "add_special": special}, "input", target.headers))
        try:
            return [int(token) for token in answer["tokens"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise UpstreamError(f"llama-server answered /tokenize in an unexpected shape: {exc!r}") from exc

    # ------------------------------------------------------------ the model and the upstream call

    async def _enter(self, mode: Mode, name: str | None) -> tuple[str, _Target, Lease]:
        """(model name, target, lease) of the model serving this request; see `complete`
        (and `BackendUnavailable` when the mode's remote backend does not answer)."""
        current = self._servers[mode].status()
        if current.backend_url is not None:  # a remote backend: model names are its own
            if current.endpoint is None:
                raise current.not_running("")
            status, lease = await self._gates[mode].enter(None)
            if status.endpoint is None:  # the gate hands out running servers only
                lease.release()
                raise status.not_running("")
            return name or status.model_name or mode, _Target.of(status, status.endpoint), lease
        if name is not None:
            await self._check_model(mode, name)
        status, lease = await self._gates[mode].enter(name)
        if status.endpoint is None or status.model_name is None:  # the gate hands out running models only
            lease.release()
            raise UpstreamError(f"The {mode} server is not running", code="upstream_error")
        return status.model_name, _Target.of(status, status.endpoint), lease

    @asynccontextmanager
    async def _using(self, mode: Mode, name: str | None) -> AsyncIterator[tuple[_Target, str]]:
        """(target, model name) of the model serving this request, leased for the block."""
        model_name, target, lease = await self._enter(mode, name)
        try:
            yield target, model_name
        finally:
            lease.release()

    async def _check_model(self, mode: Mode, name: str) -> None:
        """Raise unless `name` is a downloaded model of `mode` (see `complete`)."""
        model = await self._store.find_model(mode, name)
        if model is not None:
            if not model.is_downloaded:
                raise ModelNotFound(f"Model {name!r} is registered for {mode} but its file is missing: {model.path}",
                                    param="model", code="model_not_found")
            return
        for other in MODES:
            if other != mode and await self._store.find_model(other, name) is not None:
                raise InvalidRequest(
                    f"model: {name!r} is a model of mode {other}; {_ROUTES[mode]} serves mode {mode} "
                    f"(use {_ROUTES[other]})", param="model", code="model_mode_mismatch",
                )
        raise ModelNotFound(f"Model {name!r} not found for mode {mode}", param="model", code="model_not_found")

    async def _call(self, call: UpstreamCall) -> Any:
        """Run `call` in the upstream actor and return its decoded answer; leaving (a
        cancellation included) stops the request.  Raises what the request raised, or
        `ActorUnavailable`."""
        send, receive = trio.open_memory_channel[outcome.Outcome[Any]](1)
        scope = trio.CancelScope()
        try:
            with receive:
                try:
                    await self._ref.call(UpstreamActor.start_call, call, send, scope)
                except BaseException:
                    send.close()
                    raise
                try:
                    result = await receive.receive()
                except trio.EndOfChannel:
                    raise ActorUnavailable("The upstream actor stopped while serving the request") from None
        finally:
            scope.cancel()
        return result.unwrap()


def _for(target: _Target, model_name: str, payload: dict[str, Any]) -> dict[str, Any]:
    """`payload` naming the model for a remote backend (a farm serves several; llama-server ignores it)."""
    return {**payload, "model": model_name} if target.remote else payload


def _created_times(paths: list[str]) -> list[int]:
    """Each model file's modification time (Unix seconds); 0 for one that vanished since."""
    stamps = []
    for path in paths:
        try:
            stamps.append(int(os.stat(path).st_mtime))
        except OSError:
            stamps.append(0)
    return stamps

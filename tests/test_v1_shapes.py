"""The pure shaping of /v1 requests and answers, and the per-mode model gate (fake time)."""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field

import pytest
import trio

from zenow.errors import InvalidRequest, UpstreamError
from zenow.servers import Activity, ServerStatus
from zenow.v1 import (
    CompletionStream,
    ModelBusy,
    ModelGate,
    ModelNotLoaded,
    parse_chat_completion,
    parse_embeddings,
    parse_rerank,
)
from zenow.v1._shapes import (
    DONE,
    MAX_TOKENS_LIMIT,
    embeddings_response,
    error_event,
    float32_base64,
    rerank_response,
    sse,
    truncated_tokens,
    upstream_chat_payload,
    upstream_failure,
)

HELLO = [{"role": "user", "content": "hello"}]


def bad(parse, body) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    return caught.value


# ---------------------------------------------------------------- chat


def test_chat_options_pass_through_over_the_llm_defaults():
    request = parse_chat_completion({
        "model": "smol", "messages": HELLO, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": ["\n"],
        "presence_penalty": 0.1, "frequency_penalty": -0.1, "response_format": {"type": "json_object"},
        "logit_bias": {"15": -100}, "top_k": 3, "n": 1,
    })
    assert request.model == "smol" and request.stream is False
    payload = upstream_chat_payload(request, {"temperature": 0.7, "repeat_penalty": 1.1, "max_tokens": 2048,
                                              "context_size": 8192})
    assert payload == {
        "temperature": 0, "repeat_penalty": 1.1, "max_tokens": 2048, "messages": HELLO, "top_p": 0.5, "seed": 7,
        "stop": ["\n"], "presence_penalty": 0.1, "frequency_penalty": -0.1,
        "response_format": {"type": "json_object"}, "logit_bias": {"15": -100}, "top_k": 3, "n": 1,
        "stream": False,
    }


def test_a_null_option_is_silence_and_takes_the_default():
    payload = upstream_chat_payload(parse_chat_completion({"messages": HELLO, "temperature": None}),
                                    {"temperature": 0.7})
    assert payload["temperature"] == 0.7


def test_max_completion_tokens_wins_over_max_tokens_and_llama_server_gets_one_limit():
    request = parse_chat_completion({"messages": HELLO, "max_tokens": 9, "max_completion_tokens": 5})
    payload = upstream_chat_payload(request, {"max_tokens": 2048})
    assert payload["max_tokens"] == 5 and "max_completion_tokens" not in payload


def test_streaming_asks_llama_server_for_usage_only_when_the_client_did():
    plain = upstream_chat_payload(parse_chat_completion({"messages": HELLO, "stream": True}), {})
    assert plain["stream"] is True and plain["stream_options"] == {"include_usage": False}
    with_usage = parse_chat_completion({"messages": HELLO, "stream": True, "stream_options": {"include_usage": True}})
    assert with_usage.include_usage and upstream_chat_payload(with_usage, {})["stream_options"]["include_usage"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1, MAX_TOKENS_LIMIT + 1, 10**12, 1.5, "10", True])
def test_token_limits_are_bounded_and_named(field, value):
    error = bad(parse_chat_completion, {"messages": HELLO, field: value})
    assert error.param == field and field in str(error)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_token_limits_at_the_bounds_are_accepted(field):
    for value in (1, MAX_TOKENS_LIMIT):
        assert parse_chat_completion({"messages": HELLO, field: value}).options["max_tokens"] == value


@pytest.mark.parametrize(("body", "param"), [
    ([], None),
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"messages": [HELLO[0], {"role": "user", "content": 5}]}, "messages.1.content"),
    ({"messages": HELLO, "temperature": 3}, "temperature"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": HELLO, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"messages": HELLO, "n": 2}, "n"),
    ({"messages": HELLO, "model": ""}, "model"),
])
def test_bad_chat_requests_name_the_field(body, param):
    assert bad(parse_chat_completion, body).param == param


# ---------------------------------------------------------------- embeddings


def test_embedding_inputs_of_every_shape():
    assert parse_embeddings({"input": "one"}).inputs == ["one"]
    assert parse_embeddings({"input": ["one", "two"]}).inputs == ["one", "two"]
    assert parse_embeddings({"input": [1, 2, 3]}).inputs == [[1, 2, 3]]
    assert parse_embeddings({"input": [[1, 2], [3]]}).inputs == [[1, 2], [3]]
    assert parse_embeddings({"input": "x", "encoding_format": "base64"}).encoding_format == "base64"


@pytest.mark.parametrize(("body", "param"), [
    ({}, "input"),
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["a", ""]}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": [1, -2]}, "input"),
    ({"input": 5}, "input"),
    ({"input": ["a", 1]}, "input"),
    ({"input": ["a"] * 2049}, "input"),
    ({"input": "a", "encoding_format": "binary"}, "encoding_format"),
    ({"input": "a", "dimensions": 8}, "dimensions"),
])
def test_bad_embedding_requests_name_the_field(body, param):
    assert bad(parse_embeddings, body).param == param


def test_base64_is_little_endian_float32_as_openai_sends_it():
    vector = [0.5, -1.25, 3.0e-8]
    raw = base64.b64decode(float32_base64(vector))
    assert len(raw) == 12 and raw[:4] == b"\x00\x00\x00\x3f"
    assert list(struct.unpack("<3f", raw)) == [struct.unpack("<f", struct.pack("<f", x))[0] for x in vector]


def test_embeddings_answer_is_in_input_order_with_usage():
    upstream = {"data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}],
                "usage": {"prompt_tokens": 7, "total_tokens": 7}, "model": "/some/path.gguf"}
    answer = embeddings_response(upstream, "mini", "float", 2)
    assert answer == {"object": "list", "model": "mini", "usage": {"prompt_tokens": 7, "total_tokens": 7},
                      "data": [{"object": "embedding", "index": 0, "embedding": [1.0, 0.0]},
                               {"object": "embedding", "index": 1, "embedding": [0.0, 1.0]}]}
    encoded = embeddings_response(upstream, "mini", "base64", 2)["data"][1]["embedding"]
    assert struct.unpack("<2f", base64.b64decode(encoded)) == (0.0, 1.0)
    with pytest.raises(UpstreamError):
        embeddings_response(upstream, "mini", "float", 3)


def test_truncation_keeps_the_special_tokens_around_the_cut_text():
    plain = list(range(10, 30))
    assert truncated_tokens([2, *plain, 3], plain, 8) == [2, 10, 11, 12, 13, 14, 15, 3]
    assert truncated_tokens([1, *plain], plain, 5) == [1, 10, 11, 12, 13]
    assert truncated_tokens(plain, plain, 4) == [10, 11, 12, 13]
    assert truncated_tokens([2, 10, 3], [10], 8) == [2, 10, 3]


# ---------------------------------------------------------------- rerank


def test_rerank_documents_may_be_strings_or_objects_with_text():
    request = parse_rerank({"query": "q", "documents": ["a", {"text": "b", "id": "x"}], "top_n": 1,
                            "return_documents": True})
    assert request.documents == ["a", "b"] and request.top_n == 1 and request.return_documents


@pytest.mark.parametrize(("body", "param"), [
    ({"query": "q", "documents": []}, "documents"),
    ({"query": "q"}, "documents"),
    ({"documents": ["a"]}, "query"),
    ({"query": "", "documents": ["a"]}, "query"),
    ({"query": "q", "documents": [{"title": "a"}]}, "documents"),
    ({"query": "q", "documents": [3]}, "documents"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ({"query": "q", "documents": ["a"], "return_documents": "yes"}, "return_documents"),
])
def test_bad_rerank_requests_name_the_field(body, param):
    assert bad(parse_rerank, body).param == param


def test_rerank_answer_is_best_first_cut_to_top_n_with_documents_when_asked():
    upstream = {"results": [{"index": 0, "relevance_score": -1.0}, {"index": 1, "relevance_score": 2.5},
                            {"index": 2, "relevance_score": 0.5}], "usage": {"prompt_tokens": 12, "total_tokens": 12}}
    request = parse_rerank({"query": "q", "documents": ["a", "b", "c"], "top_n": 2, "return_documents": True})
    answer = rerank_response(upstream, request, "ranker")
    assert answer["model"] == "ranker" and answer["object"] == "list" and answer["id"].startswith("rerank-")
    assert answer["results"] == [{"index": 1, "relevance_score": 2.5, "document": {"text": "b"}},
                                 {"index": 2, "relevance_score": 0.5, "document": {"text": "c"}}]
    assert answer["usage"] == {"prompt_tokens": 12, "total_tokens": 12}
    plain = rerank_response(upstream, parse_rerank({"query": "q", "documents": ["a", "b", "c"]}), "ranker")
    assert [r["index"] for r in plain["results"]] == [1, 2, 0] and "document" not in plain["results"][0]


# ---------------------------------------------------------------- llama-server's errors and SSE


def test_upstream_failures_are_the_clients_when_the_input_is_too_long_or_refused():
    too_long = upstream_failure(500, json.dumps({"error": {"code": 500, "type": "server_error", "message":
                                "input (520 tokens) is too large to process. increase the physical batch size"}}),
                                "input")
    assert isinstance(too_long, InvalidRequest) and too_long.param == "input"
    assert too_long.code == "context_length_exceeded"
    refused = upstream_failure(400, '{"error":{"message":"bad grammar","type":"invalid_request_error"}}', None)
    assert isinstance(refused, InvalidRequest) and "bad grammar" in str(refused)
    broken = upstream_failure(500, "<html>oops</html>", "input")
    assert isinstance(broken, UpstreamError) and broken.status_code == 502 and "oops" in str(broken)


def test_each_event_is_one_whole_frame():
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    event = json.loads(error_event("it broke")[6:])
    assert event == {"error": {"message": "it broke", "type": "server_error", "param": None, "code": "upstream_error"}}


# ---------------------------------------------------------------- the model gate


@dataclass
class FakeServer:
    """A server handle whose loads take `load_time` seconds of (fake) time."""

    mode: str = "llm"
    running: str | None = "a"
    load_time: float = 1.0
    loads: list[str] = field(default_factory=list)
    activity: Activity = field(default_factory=Activity)

    def asleep(self) -> bool:
        return False

    def status(self) -> ServerStatus:
        if self.running is None:
            return ServerStatus()
        return ServerStatus("running", self.running, f"/m/{self.running}.gguf", None, "http://127.0.0.1:1")

    async def load(self, name: str, download_url: str | None) -> ServerStatus:
        self.loads.append(name)
        self.running = None
        await trio.sleep(self.load_time)
        self.running = name
        return self.status()


async def test_the_gate_serves_the_running_model_without_loading(autojump_clock):
    server = FakeServer()
    gate = ModelGate(server, switch_wait=30)  # type: ignore[arg-type]
    status, lease = await gate.enter(None)
    assert status.model_name == "a" and gate.leases == 1
    _, again = await gate.enter("a")
    assert gate.leases == 2 and server.loads == []
    lease.release()
    lease.release()  # idempotent
    again.release()
    assert gate.leases == 0


async def test_the_gate_says_nothing_runs_when_no_model_is_named(autojump_clock):
    gate = ModelGate(FakeServer(running=None), switch_wait=30)  # type: ignore[arg-type]
    with pytest.raises(ModelNotLoaded) as caught:
        await gate.enter(None)
    assert caught.value.status_code == 503 and caught.value.code == "model_not_loaded"


async def test_a_switch_waits_for_the_requests_in_flight_and_holds_new_ones(autojump_clock):
    server = FakeServer()
    gate = ModelGate(server, switch_wait=30)  # type: ignore[arg-type]
    _, streaming = await gate.enter("a")
    order = []

    async def switch():
        status, lease = await gate.enter("b")
        order.append(("switched", status.model_name, trio.current_time()))
        lease.release()

    async def later_request():
        await trio.sleep(1)
        status, lease = await gate.enter(None)
        order.append(("later", status.model_name, trio.current_time()))
        lease.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(switch)
        nursery.start_soon(later_request)
        await trio.sleep(5)
        assert order == [] and server.loads == []  # nothing cut, nothing jumped the queue
        streaming.release()
    assert server.loads == ["b"]
    assert [(what, name) for what, name, _ in order] == [("switched", "b"), ("later", "b")]
    assert order[0][2] == pytest.approx(6.0)  # 5 s waiting for the stream, 1 s loading


async def test_a_switch_that_waits_too_long_is_a_409_and_lets_the_others_go_on(autojump_clock):
    server = FakeServer()
    gate = ModelGate(server, switch_wait=10)  # type: ignore[arg-type]
    _, streaming = await gate.enter("a")
    with pytest.raises(ModelBusy) as caught:
        await gate.enter("b")
    assert caught.value.status_code == 409 and caught.value.param == "model"
    assert trio.current_time() == pytest.approx(10.0)
    assert server.loads == [] and server.running == "a"
    status, other = await gate.enter(None)
    assert status.model_name == "a"
    streaming.release()
    other.release()


def test_an_integral_float_is_an_integer_as_json_schema_says_but_a_string_or_bool_is_not():
    request = parse_chat_completion({"messages": HELLO, "max_tokens": 5.0, "seed": 7.0, "n": 1.0})
    assert request.options["max_tokens"] == 5 and isinstance(request.options["max_tokens"], int)
    assert (request.options["seed"], request.options["n"]) == (7, 1) and isinstance(request.options["seed"], int)
    assert parse_embeddings({"input": [1.0, 2]}).inputs == [[1, 2]]
    assert parse_rerank({"query": "q", "documents": ["a"], "top_n": 2.0}).top_n == 2
    for value in (5.5, "5", True):
        assert bad(parse_chat_completion, {"messages": HELLO, "max_tokens": value}).param == "max_tokens"


async def test_a_stream_that_stops_without_done_still_ends_with_an_error_event_and_done():
    send, receive = trio.open_memory_channel[bytes](4)
    stream = CompletionStream(receive, trio.CancelScope())
    async with send:
        await send.send(sse({"choices": []}))
    got = [frame async for frame in stream.frames()]
    assert got[0] == sse({"choices": []}) and got[-1] == DONE
    assert json.loads(got[1][6:])["error"]["code"] == "stream_interrupted"


async def test_cancelling_a_stream_cancels_its_upstream_scope_and_closes_the_channel():
    send, receive = trio.open_memory_channel[bytes](4)
    stream = CompletionStream(receive, trio.CancelScope())
    stream.cancel()
    assert stream.scope.cancel_called
    with pytest.raises(trio.BrokenResourceError):
        send.send_nowait(DONE)


async def test_the_gate_wakes_a_model_stopped_for_idleness_and_counts_its_leases(autojump_clock):
    @dataclass
    class IdleServer(FakeServer):
        wakes: int = 0
        stopped: bool = True

        def status(self) -> ServerStatus:
            if self.stopped:
                return ServerStatus("stopped", "a", "/m/a.gguf", reason="idle")
            return super().status()

        def asleep(self) -> bool:
            return self.stopped

        async def wake(self) -> ServerStatus:
            self.wakes += 1
            await trio.sleep(self.load_time)
            self.stopped = False
            return self.status()

    server = IdleServer()
    gate = ModelGate(server, switch_wait=30)  # type: ignore[arg-type]
    status, lease = await gate.enter(None)
    assert (status.status, status.model_name, server.wakes, server.loads) == ("running", "a", 1, [])
    assert server.activity.busy == 1
    lease.release()
    lease.release()  # idempotent
    assert server.activity.busy == 0 and server.activity.last == trio.current_time()


LLAMA_CHUNK = ('{"choices":[{"finish_reason":null,"index":0,"delta":{"content":%s}}],"created":1795607800,'
               '"id":"chatcmpl-hJHSbnW0756jJUjRmACtAS0tGRyQ5b43","model":"/home/me/models/SmolLM2.gguf",'
               '"system_fingerprint":"b1-0c1e570","object":"chat.completion.chunk"}')


@pytest.mark.parametrize("content", ["Hello", ' "quoted" \\ back', "caf\u00e9 \u2615\n", '","model":"x', "\u0001"])
@pytest.mark.parametrize("ascii_only", [False, True])
def test_the_usual_content_chunk_gets_zenows_model_name_on_its_text(content, ascii_only):
    from zenow.event_stream import decode_literal
    from zenow.v1._shapes import chat_chunk, content_chunk_event, sse

    data = (LLAMA_CHUNK % json.dumps(content, ensure_ascii=ascii_only)).encode()
    event = content_chunk_event(data, json.dumps("smol").encode())
    assert event is not None
    frame, literal = event
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert decode_literal(literal) == content
    assert json.loads(frame[6:]) == json.loads(sse(chat_chunk(json.loads(data), "smol"))[6:])
    assert json.loads(frame[6:])["model"] == "smol"
    assert json.loads(frame[6:])["choices"][0]["delta"]["content"] == content


@pytest.mark.parametrize("data", [
    '{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"created":1,'
    '"id":"c","model":"m","system_fingerprint":"f","object":"chat.completion.chunk"}',
    '{"choices":[{"finish_reason":"length","index":0,"delta":{}}],"created":1,"id":"c","model":"m",'
    '"system_fingerprint":"f","object":"chat.completion.chunk"}',
    '{"error":{"code":500,"message":"boom","type":"server_error"}}',
    (LLAMA_CHUNK % '"hi"')[:-1] + ',"usage":{"completion_tokens":1}}',
])
def test_any_other_chunk_is_left_to_be_decoded(data):
    from zenow.v1._shapes import content_chunk_event

    assert content_chunk_event(data.encode(), json.dumps("smol").encode()) is None

"""The next turn's prefix, read into llama-server's cache after a reply (`zenow.servers.prefill`)."""

from __future__ import annotations

import json
import time
from functools import partial

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_llama_server import render_chat
from tests.support.harness import make_settings, respawn, start_zenow, wait_for, wait_status
from tests.support.llama import FAKE_LLAMA_SERVER, child_auth, child_url
from tests.support.llama import fake_events as events
from tests.support.tiny_models import write_stub_model
from zenow.servers import PLACEHOLDER, next_turn_prefix
from zenow.settings import DEFAULT_SYSTEM_PROMPT, Settings


@pytest.fixture
async def fake(nursery, tmp_path, event_log, request):
    home = tmp_path / "home"
    write_stub_model(home / "models" / "llm" / "fake.gguf")
    prefill = getattr(request, "param", True)
    settings = make_settings(home, llama_server=str(FAKE_LLAMA_SERVER), prefill_next_turn=prefill)
    async with start_zenow(nursery, settings) as zenow:
        assert (await zenow.client.post("/api/models/load", json={"model_name": "fake"})).status_code == 200
        yield zenow


async def session(client: httpx.AsyncClient) -> int:
    return (await client.post("/api/sessions", json={"first_message": "hi"})).json()["session_id"]


async def chat(client: httpx.AsyncClient, sid: int, text: str, **extra) -> str:
    """A streamed chat on `sid`: the reply's text (the stream read to its end)."""
    async with client.stream("POST", "/api/chat", json={
            "session_id": sid, "stream": True, "messages": [{"role": "user", "content": text}], **extra}) as answer:
        assert answer.status_code == 200
        raw = "".join([chunk async for chunk in answer.aiter_text()])
    assert raw.endswith("data: [DONE]\n\n")
    frames = [json.loads(f[6:]) for f in raw.split("\n\n")[:-2]]
    return "".join(f["choices"][0]["delta"]["content"] for f in frames)


def requests(path, route: str) -> list[dict]:
    return [e for e in events(path, "request") if e["path"] == route]


async def metric(client: httpx.AsyncClient, name: str) -> float:
    text = (await client.get("/metrics")).text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name)


# ------------------------------------------------------------------ the prefix


def test_the_prefix_is_what_the_template_puts_before_the_placeholder():
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "Hello."}]
    rendered = render_chat([*conversation, {"role": "user", "content": PLACEHOLDER}])
    prefix = next_turn_prefix(rendered)
    assert prefix == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                      "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n")
    # whatever the user writes next, the prompt starts with it
    assert render_chat([*conversation, {"role": "user", "content": "and then?"}]).startswith(prefix)


def test_a_template_that_drops_or_leads_with_the_placeholder_gives_no_prefix():
    assert next_turn_prefix("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n") is None
    assert next_turn_prefix(PLACEHOLDER + "<|im_end|>") is None  # nothing before it to read


def test_the_setting_is_on_by_default_and_turned_off_by_the_environment():
    def setting(**env: str) -> bool:
        return Settings.from_environment({"HOME": "/nonexistent", **env}).prefill_next_turn

    assert setting() is True
    assert [setting(ZENOW_PREFILL_NEXT_TURN=v) for v in ("off", "0", "No", "on", "TRUE")] == \
        [False, False, False, True, True]
    with pytest.raises(ValueError, match="ZENOW_PREFILL_NEXT_TURN is on or off, not 'later'"):
        setting(ZENOW_PREFILL_NEXT_TURN="later")


# ------------------------------------------------------------------ with the fake llama-server


async def test_after_a_reply_the_next_turns_prefix_is_read_and_starts_the_next_prompt(fake, event_log):
    client = fake.client
    prefills, tokens = (await metric(client, "zenow_chat_prefills_total"),
                        await metric(client, "zenow_chat_prefill_tokens_total"))  # this process's, so far
    sid = await session(client)
    reply = await chat(client, sid, "hello there")
    assert reply == "Hello from the fake server."
    await wait_for(lambda: _async(events(event_log, "prompt_read")), timeout=10, what="the prefill")
    (template,) = requests(event_log, "/apply-template")
    assert template["body"]["messages"] == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": reply}, {"role": "user", "content": PLACEHOLDER}]
    (completion,) = requests(event_log, "/completion")
    prefix = completion["body"]["prompt"]
    assert completion["body"]["n_predict"] == 0 and completion["body"]["cache_prompt"] is True
    assert prefix.endswith("Hello from the fake server.<|im_end|>\n<|im_start|>user\n")

    await chat(client, sid, "and then?")
    second = requests(event_log, "/v1/chat/completions")[-1]
    assert render_chat(second["body"]["messages"]).startswith(prefix)  # what the cache holds, the prompt reuses

    async def counted() -> bool:  # after each reply
        return await metric(client, "zenow_chat_prefills_total") == prefills + 2
    await wait_for(counted, timeout=10, what="the second prefill")
    read = [e["tokens"] for e in events(event_log, "prompt_read")]
    assert len(read) == 2 and read[1] > read[0]
    assert await metric(client, "zenow_chat_prefill_tokens_total") == tokens + sum(read)


async def _async(value):
    return value


async def test_the_reply_ends_first_and_only_the_sessions_next_chat_waits_for_the_prefill(fake, event_log,
                                                                                          monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_COMPLETION_DELAY", "1.5")
    await respawn(fake)
    client = fake.client
    sid, other = await session(client), await session(client)
    await chat(client, sid, "first")
    done_at = time.time()
    assert not events(event_log, "prompt_read")  # the client had the whole reply before the prefill ended
    async with trio.open_nursery() as both:
        both.start_soon(chat, client, sid, "second")
        both.start_soon(chat, client, other, "elsewhere")
    read = events(event_log, "prompt_read")[0]  # the first reply's prefill (the others' come after them)
    assert read["time"] > done_at
    asked = {e["body"]["messages"][-1]["content"]: e["time"] for e in requests(event_log, "/v1/chat/completions")}
    assert asked["second"] >= read["time"]  # the session's next chat waited for its prefill
    assert asked["elsewhere"] < read["time"]  # another session's did not


async def test_a_server_without_the_routes_chats_as_before(fake, event_log, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_WITHOUT", "/completion")
    await respawn(fake)
    client = fake.client
    prefills = await metric(client, "zenow_chat_prefills_total")
    sid = await session(client)
    assert await chat(client, sid, "one") == await chat(client, sid, "two") == "Hello from the fake server."
    await wait_for(lambda: _async(len(requests(event_log, "/completion")) == 2), timeout=10,
                   what="both replies' prefills, answered 404")
    stored = (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
    assert [m["content"] for m in stored] == ["one", "Hello from the fake server.", "two",
                                              "Hello from the fake server."]
    assert await metric(client, "zenow_chat_prefills_total") == prefills


@pytest.mark.parametrize("fake", [False], indirect=True)
async def test_turned_off_nothing_is_asked_after_a_reply(fake, event_log):
    client = fake.client
    sid = await session(client)
    await chat(client, sid, "one")
    await chat(client, sid, "two")  # under the session's lock: after anything the first reply started
    assert not requests(event_log, "/apply-template") and not requests(event_log, "/completion")


async def test_a_reply_the_client_left_is_not_prefilled(fake, event_log, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "400")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.02")
    await respawn(fake)
    client = fake.client
    sid = await session(client)
    async with client.stream("POST", "/api/chat", json={
            "session_id": sid, "stream": True, "messages": [{"role": "user", "content": "go on"}]}) as answer:
        async for line in answer.aiter_lines():
            if line.startswith("data: {"):
                break
    await wait_for(lambda: _async(events(event_log, "client_disconnected")), timeout=5, what="the disconnect")
    await chat(client, sid, "again", max_tokens=2)  # after the first chat's end, under the session's lock
    await wait_for(lambda: _async(requests(event_log, "/apply-template")), timeout=10, what="a prefill")
    (template,) = requests(event_log, "/apply-template")  # the second reply's, not the partial one's
    assert template["body"]["messages"][-2:] == [{"role": "assistant", "content": "Hello from"},
                                                 {"role": "user", "content": PLACEHOLDER}]


@pytest.mark.parametrize(("slots", "prefilled"), [(1, ["short"]), (2, ["short", "long"])])
async def test_no_prefill_while_other_requests_fill_every_slot(fake, event_log, monkeypatch, slots, prefilled):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "60")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.02")
    client = fake.client
    # the slots' change restarts the fake child, which takes the environment above
    assert (await client.post("/api/models/update_param", json={"parallel": slots})).json()["requires_restart"] is True
    await wait_status(client, "running")
    prefills = await metric(client, "zenow_chat_prefills_total")
    long_sid, short_sid = await session(client), await session(client)
    long_started = trio.Event()

    async def long_chat() -> None:
        async with client.stream("POST", "/api/chat", json={
                "session_id": long_sid, "stream": True, "messages": [{"role": "user", "content": "long"}]}) as answer:
            async for line in answer.aiter_lines():
                long_started.set()
                if line == "data: [DONE]":
                    break

    async with trio.open_nursery() as both:
        both.start_soon(long_chat)
        await long_started.wait()
        # two slots: both generate and the short chat ends first; one: it waits for the long chat's slot
        await chat(client, short_sid, "short", max_tokens=2)

    async def counted() -> bool:
        return await metric(client, "zenow_chat_prefills_total") == prefills + len(prefilled)
    await wait_for(counted, timeout=10, what="the prefills")
    # one slot: the long chat ended with the short one waiting for its slot, and a prefill then would
    # have held the short one up; with two, a slot was free after each reply
    assert [e["body"]["messages"][1]["content"] for e in requests(event_log, "/apply-template")] == prefilled


# ------------------------------------------------------------------ with the real llama-server


async def computed_by_the_next_turn(nursery, home, llama_server, smollm2, prefill: bool,
                                    via: str = "/api/chat") -> tuple[int, int]:
    """The prompt tokens llama-server computes for a conversation's second turn, and the tokens of that
    turn's message: a conversation with some history, one turn, then (once any prefill ended) the next;
    a session's through `/api/chat`, or the messages sent whole to `/v1/chat/completions`."""
    settings = make_settings(home, llama_server=llama_server, default_llm=smollm2, prefill_next_turn=prefill)
    async with start_zenow(nursery, settings) as zenow:
        client = zenow.client
        await wait_status(client, "running")
        prefills = await metric(client, "zenow_chat_prefills_total")
        history = [{"role": role, "content": text} for n in range(4) for role, text in (
            ("user", f"Tell me about the mill, part {n}."),
            ("assistant", f"Part {n}: the miller kept a ledger of every sack of grain."))]
        first, question = "What did the ledger hold?", "And who read the ledger?"
        options = {"temperature": 0, "max_tokens": 12}
        if via == "/api/chat":
            sid = await session(client)
            for message in history:
                await client.post(f"/api/sessions/{sid}/messages", json=message)
            await chat(client, sid, first, **options)
        else:
            history.append({"role": "user", "content": first})
            history.append({"role": "assistant", "content": await v1_chat(client, history, **options)})
        if prefill:
            async def prefilled() -> bool:
                return await metric(client, "zenow_chat_prefills_total") > prefills
            await wait_for(prefilled, timeout=60, what="the prefill")
        async with httpx.AsyncClient(base_url=child_url(), auth=child_auth(), timeout=60) as direct:
            before = await llama_metric(direct, "llamacpp:prompt_tokens_total")
            if via == "/api/chat":
                await chat(client, sid, question, **options)
            else:
                await v1_chat(client, [*history, {"role": "user", "content": question}], **options)
            after = await llama_metric(direct, "llamacpp:prompt_tokens_total")
            tokens = len((await direct.post("/tokenize", json={"content": question})).json()["tokens"])
        return int(after - before), tokens


async def llama_metric(direct: httpx.AsyncClient, name: str) -> float:
    text = (await direct.get("/metrics")).text
    (value,) = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return value


@pytest.mark.real_llama
@pytest.mark.parametrize("via", ["/api/chat", "/v1/chat/completions"])
async def test_with_the_prefill_the_next_turn_computes_little_more_than_its_message(nursery, tmp_path,
                                                                                    llama_server, smollm2, via):
    with_it, message = await computed_by_the_next_turn(nursery, tmp_path / "on", llama_server, smollm2, True, via)
    without, again = await computed_by_the_next_turn(nursery, tmp_path / "off", llama_server, smollm2, False, via)
    assert message == again
    # the message, its end and the assistant's start (ChatML: <|im_end|> \n <|im_start|> assistant \n)
    assert with_it <= message + 6, (with_it, message)
    # without it the turn also computes the reply's end and the user's start (<|im_end|> \n <|im_start|> user \n)
    assert without >= with_it + 4, (without, with_it)


# ------------------------------------------------------------------ /v1: the conversation is the request's


async def v1_chat(client: httpx.AsyncClient, messages: list[dict], *, stream: bool = True, **extra) -> str:
    """A `/v1/chat/completions` of `messages`: the reply's text (a stream read to its end)."""
    body = {"messages": messages, "stream": stream, **extra}
    if not stream:
        answer = await client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["message"]["content"]
    async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        assert answer.status_code == 200
        raw = "".join([chunk async for chunk in answer.aiter_text()])
    assert raw.endswith("data: [DONE]\n\n")
    chunks = [json.loads(f[6:]) for f in raw.split("\n\n")[:-2]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_a_whole_v1_completion_is_read_ahead_only_when_it_ended_well_with_text():
    from zenow.v1._readahead import completion_reply

    def answer(message: object = None, finish: object = "stop", choices: int = 1) -> dict:
        choice = {"message": {"role": "assistant", "content": "Hi."} if message is None else message,
                  "finish_reason": finish}
        return {"choices": [choice] * choices}

    assert completion_reply(answer()) == completion_reply(answer(finish="length")) == "Hi."
    for odd in (answer(finish="tool_calls"), answer(finish=None), answer(finish=["stop"]), answer(finish={}),
                answer(message={"content": None}), answer(message={"content": ["Hi."]}), answer(message="Hi."),
                answer(choices=2), answer(choices=0), {"choices": "Hi."}, {}):
        assert completion_reply(odd) is None, odd


@pytest.mark.parametrize("stream", [True, False])
async def test_after_a_v1_completion_its_next_turn_is_read_and_starts_the_next_prompt(fake, event_log, stream):
    client = fake.client
    prefills = await metric(client, "zenow_chat_prefills_total")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    reply = await v1_chat(client, messages, stream=stream)
    assert reply == "Hello from the fake server."
    await wait_for(lambda: _async(events(event_log, "prompt_read")), timeout=10, what="the read ahead")
    (template,) = requests(event_log, "/apply-template")
    conversation = [*messages, {"role": "assistant", "content": reply}]
    assert template["body"]["messages"] == [*conversation, {"role": "user", "content": PLACEHOLDER}]
    (completion,) = requests(event_log, "/completion")
    prefix = completion["body"]["prompt"]
    assert completion["body"]["n_predict"] == 0 and prefix.endswith(f"{reply}<|im_end|>\n<|im_start|>user\n")
    assert await metric(client, "zenow_chat_prefills_total") == prefills + 1

    await v1_chat(client, [*conversation, {"role": "user", "content": "and then?"}], stream=stream)
    second = requests(event_log, "/v1/chat/completions")[-1]
    assert render_chat(second["body"]["messages"]).startswith(prefix)  # what the cache holds, the prompt reuses


@pytest.mark.parametrize("stream", [True, False])
async def test_the_v1_conversations_next_request_waits_for_its_read_and_no_other_does(fake, event_log, monkeypatch,
                                                                                     stream):
    monkeypatch.setenv("FAKE_LLAMA_COMPLETION_DELAY", "1.5")
    await respawn(fake)
    client = fake.client
    first = [{"role": "user", "content": "first"}]
    reply = await v1_chat(client, first, stream=stream)
    done_at = time.time()
    assert not events(event_log, "prompt_read")  # the client had the whole reply before the read ended
    # the client sends the reply back trimmed and with the next question: the same conversation
    going_on = [*first, {"role": "assistant", "content": f" {reply}\n"}, {"role": "user", "content": "second"}]
    elsewhere = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "Something else."},
                 {"role": "user", "content": "elsewhere"}]
    async with trio.open_nursery() as both:
        both.start_soon(partial(v1_chat, client, going_on, stream=stream))
        both.start_soon(partial(v1_chat, client, elsewhere, stream=stream))
    read = events(event_log, "prompt_read")[0]  # the first reply's read (the others' come after them)
    assert read["time"] > done_at
    asked = {e["body"]["messages"][-1]["content"]: e["time"] for e in requests(event_log, "/v1/chat/completions")}
    assert asked["second"] >= read["time"]  # the conversation's next request waited for its read
    assert asked["elsewhere"] < read["time"]  # another conversation's did not


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]},
    {"chat_template_kwargs": {"enable_thinking": False}},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
    {"messages": [{"role": "user", "content": "hi", "name": "ann"}]},
    {"messages": [{"role": "tool", "content": "12:00", "tool_call_id": "1"}, {"role": "user", "content": "hi"}]},
], ids=["tools", "template-arguments", "content-parts", "message-name", "tool-message"])
async def test_a_v1_conversation_the_template_may_render_otherwise_is_not_read_ahead(fake, event_log, extra):
    client = fake.client
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, **extra}
    async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        assert answer.status_code == 200
        assert (await answer.aread()).endswith(b"data: [DONE]\n\n")
    await v1_chat(client, [{"role": "user", "content": "plain"}])  # read ahead: after anything the first began
    await wait_for(lambda: _async(requests(event_log, "/apply-template")), timeout=10, what="the plain one's read")
    assert [e["body"]["messages"][0]["content"] for e in requests(event_log, "/apply-template")] == ["plain"]


async def test_a_v1_reply_the_client_left_is_not_read_ahead(fake, event_log, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_COUNT", "400")
    monkeypatch.setenv("FAKE_LLAMA_TOKEN_DELAY", "0.02")
    await respawn(fake)
    client = fake.client
    body = {"messages": [{"role": "user", "content": "go on"}], "stream": True}
    async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        async for line in answer.aiter_lines():
            if '"content":"' in line:
                break
    await wait_for(lambda: _async(events(event_log, "client_disconnected")), timeout=5, what="the disconnect")
    await v1_chat(client, [{"role": "user", "content": "again"}], max_tokens=2)
    await wait_for(lambda: _async(requests(event_log, "/apply-template")), timeout=10, what="a read ahead")
    (template,) = requests(event_log, "/apply-template")  # the second reply's, not the partial one's
    assert template["body"]["messages"][0] == {"role": "user", "content": "again"}


@pytest.mark.parametrize("fake", [False], indirect=True)
async def test_turned_off_nothing_is_read_ahead_after_a_v1_completion(fake, event_log):
    client = fake.client
    first = [{"role": "user", "content": "one"}]
    reply = await v1_chat(client, first)
    await v1_chat(client, [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "two"}],
                  stream=False)
    await trio.sleep(0.2)  # nothing runs after a reply that could ask later
    assert not requests(event_log, "/apply-template") and not requests(event_log, "/completion")

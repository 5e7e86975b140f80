"""/api/chat against the real llama-server with SmolLM2 (temperature 0)."""

from __future__ import annotations

import json
import os
import re
import shutil

import httpx
import pytest
import trio

from tests.support.harness import make_settings, start_zenow, wait_status
from tests.support.llama import child_auth, child_url
from zenow.chat import Turn, history_in_steps

pytestmark = pytest.mark.real_llama

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "spec", "zenow-api.md")


@pytest.fixture
async def smol(nursery, tmp_path, llama_server, smollm2):
    settings = make_settings(tmp_path / "home", llama_server=llama_server, default_llm=smollm2)
    async with start_zenow(nursery, settings) as zenow:
        await wait_status(zenow.client, "running")
        yield zenow


async def new_session(client, text="hello"):
    return (await client.post("/api/sessions", json={"first_message": text})).json()["session_id"]


def parse_sse(raw: str):
    """The deltas and other events of an SSE body; asserts every event is well framed."""
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] for e in events]


async def messages(client, sid):
    return (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]


async def test_a_streamed_reply_is_saved_exactly_as_streamed(smol):
    client = smol.client
    sid = await new_session(client)
    async with client.stream("POST", "/api/chat", json={
        "session_id": sid, "stream": True, "temperature": 0, "max_tokens": 40,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        raw = "".join([chunk async for chunk in response.aiter_text()])
    events = parse_sse(raw)
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert all(deltas) and len(deltas) > 3
    text = "".join(deltas)
    assert "Paris" in text
    saved = await messages(client, sid)
    assert [m["role"] for m in saved] == ["user", "assistant"]
    assert saved[0]["content"] == "What is the capital of France?"
    assert saved[1]["content"] == text
    async with httpx.AsyncClient(timeout=60, auth=child_auth()) as direct:  # token counts are the model's own
        tokens = (await direct.post(f"{child_url()}/tokenize", json={"content": text})).json()["tokens"]
    assert saved[1]["token_count"] == len(tokens)
    detail = (await client.get(f"/api/sessions/{sid}")).json()
    assert detail["message_count"] == 2
    assert detail["total_tokens"] == saved[0]["token_count"] + saved[1]["token_count"]


async def test_the_second_turn_carries_the_first(smol):
    client = smol.client
    sid = await new_session(client)
    first = (await client.post("/api/chat", json={
        "session_id": sid, "temperature": 0, "max_tokens": 24,
        "messages": [{"role": "user", "content": "My name is Zed. Say hello to me."}],
    })).json()
    assert set(first) == {"choices", "usage", "session_id"} and first["session_id"] == sid
    assert first["choices"][0]["message"]["role"] == "assistant"
    assert first["choices"][0]["finish_reason"] in ("stop", "length")
    second = (await client.post("/api/chat", json={  # the original front end's single `message`
        "session_id": sid, "temperature": 0, "max_tokens": 8,
        "message": {"role": "user", "content": "What is my name?"},
    })).json()
    saved = await messages(client, sid)
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]
    assert saved[1]["content"] == first["choices"][0]["message"]["content"]
    # the second prompt holds the whole first turn: its tokens plus the new question
    grown = second["usage"]["prompt_tokens"] - first["usage"]["prompt_tokens"]
    assert grown >= saved[1]["token_count"] + saved[2]["token_count"]


async def test_a_long_history_is_cut_to_the_newest_whole_messages_within_half_the_context(smol):
    client = smol.client
    await client.post("/api/models/update_param", json={"context_size": 1024})
    sid = await new_session(client)
    for i in range(150):
        await client.post(f"/api/sessions/{sid}/messages",
                          json={"role": "user", "content": f"Question {i}: what is {i} plus {i}?"})
        await client.post(f"/api/sessions/{sid}/messages",
                          json={"role": "assistant", "content": f"{i} plus {i} is {2 * i}."})
    stored = await messages(client, sid)
    assert len(stored) == 300
    system_prompt = (await client.get("/api/models/get_param")).json()["system_prompt"]
    async with httpx.AsyncClient(timeout=60, auth=child_auth()) as direct:
        tokenized = await direct.post(f"{child_url()}/tokenize", json={"content": system_prompt})
        system_tokens = len(tokenized.json()["tokens"])
    kept = history_in_steps(1024 // 2 - system_tokens, sum(m["token_count"] for m in stored),
                            [Turn(m["role"], m["content"], m["token_count"]) for m in reversed(stored)])
    assert 10 < len(kept) < 300 and kept[0].role == "user"
    assert [t.content for t in kept] == [m["content"] for m in stored[-len(kept):]]

    question = {"role": "user", "content": "What was the last question?"}
    answer = (await client.post("/api/chat", json={"session_id": sid, "temperature": 0, "max_tokens": 1,
                                                    "messages": [question]})).json()

    async def prompt_tokens(history):
        conversation = [{"role": "system", "content": system_prompt}]
        conversation += [{"role": t.role, "content": t.content} for t in history] + [question]
        async with httpx.AsyncClient(timeout=60, auth=child_auth()) as direct:
            probe = await direct.post(f"{child_url()}/v1/chat/completions", json={
                "messages": conversation, "max_tokens": 1, "temperature": 0})
        return probe.json()["usage"]["prompt_tokens"]

    assert answer["usage"]["prompt_tokens"] == await prompt_tokens(kept)
    longer = [Turn(m["role"], m["content"], m["token_count"]) for m in stored[-len(kept) - 2:]]
    assert answer["usage"]["prompt_tokens"] < await prompt_tokens(longer)


async def test_the_specs_javascript_example_streams_under_node(smol, tmp_path):
    text = await trio.Path(SPEC).read_text(encoding="utf-8")
    example = re.search(r"### 7\.1.*?```javascript\n(.*?)```", text, re.S).group(1)
    await smol.client.post("/api/models/update_param", json={"max_tokens": 24, "temperature": 0})
    script = tmp_path / "example.mjs"
    script.write_text(example.replace("http://localhost:8050", smol.url), encoding="utf-8")
    with trio.fail_after(120):
        result = await trio.run_process(["node", str(script)], capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    printed = result.stdout.decode()
    sessions = (await smol.client.get("/api/sessions")).json()["sessions"]
    assert sessions[0]["session_name"] == "你好，请介绍一下自己"
    saved = await messages(smol.client, sessions[0]["id"])
    assert saved[-1]["role"] == "assistant" and saved[-1]["content"]
    assert printed.replace("\n", "") == saved[-1]["content"].replace("\n", "")


async def test_the_window_is_the_one_the_running_model_has(nursery, tmp_path, llama_server, tiny_models):
    """tiny-llama was trained for 4096 tokens: with context_size at its 8192 default it runs with 4096,
    and a chat is measured against 4096 (one token per byte for this model)."""
    home = tmp_path / "home"
    (home / "models" / "llm").mkdir(parents=True)
    shutil.copy(tiny_models["llm"], home / "models" / "llm" / "tiny-llama.gguf")
    async with start_zenow(nursery, make_settings(home, llama_server=llama_server)) as zenow:
        client = zenow.client
        assert (await client.post("/api/models/load", json={"model_name": "tiny-llama"})).status_code == 200
        sid = await new_session(client)
        too_long = await client.post("/api/chat", json={"session_id": sid, "messages": [
            {"role": "user", "content": "a" * 4100}]})
        assert too_long.status_code == 400
        assert "more than the context window of 4096 tokens" in too_long.json()["detail"]
        fits = await client.post("/api/chat", json={"session_id": sid, "max_tokens": 4, "messages": [
            {"role": "user", "content": "a" * 1000}]})
        assert fits.status_code == 200 and fits.json()["usage"]["completion_tokens"] == 4

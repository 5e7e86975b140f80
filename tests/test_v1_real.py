"""/v1 against the real llama-server, driven by the official `openai` SDK (and httpx for rerank).

SmolLM2 answers chat at temperature 0; the tiny random-weight models of
tests/support/tiny_models.py serve embeddings, rerank, and a second llm to switch to.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import httpx
import numpy as np
import openai
import pytest
import trio

from tests.support.harness import make_settings, start_zenow, status, wait_status
from tests.support.llama import child_auth

pytestmark = pytest.mark.real_llama

T = TypeVar("T")

SMOL = "SmolLM2-135M-Instruct.Q4_1"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@asynccontextmanager
async def serving(nursery, home, llama_server, smollm2, files):
    """zenow with SmolLM2 running in llm and `files` ({(mode, name): path}) registered, not running."""
    for (mode, name), path in files.items():
        (home / "models" / mode).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, home / "models" / mode / f"{name}.gguf")
    settings = make_settings(home, llama_server=llama_server, default_llm=smollm2)
    async with start_zenow(nursery, settings) as running:
        await wait_status(running.client, "running")
        yield running


@pytest.fixture
async def zenow(nursery, tmp_path, llama_server, smollm2, tiny_models):
    """SmolLM2 running in llm; tiny-llama (llm), tiny-embed and tiny-rerank registered, not running."""
    files = {("llm", "tiny-llama"): tiny_models["llm"], ("embed", "tiny-embed"): tiny_models["embed"],
             ("rerank", "tiny-rerank"): tiny_models["rerank"]}
    async with serving(nursery, tmp_path / "home", llama_server, smollm2, files) as running:
        yield running


def sdk(zenow) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{zenow.url}/v1", api_key="unused", max_retries=0, timeout=120)


async def in_thread(call: Callable[[], T]) -> T:
    """The SDK's sync client, off the event loop (its async client needs asyncio)."""
    return await trio.to_thread.run_sync(call)


async def test_models_lists_every_downloaded_model_with_its_mode_and_whether_it_runs(zenow):
    client = sdk(zenow)
    models = {m.id: m for m in await in_thread(lambda: list(client.models.list()))}
    assert set(models) == {SMOL, "tiny-llama", "tiny-embed", "tiny-rerank"}
    assert {name: (m.model_extra["mode"], m.model_extra["running"]) for name, m in models.items()} == {
        SMOL: ("llm", True), "tiny-llama": ("llm", False), "tiny-embed": ("embed", False),
        "tiny-rerank": ("rerank", False),
    }
    assert all(m.object == "model" and m.owned_by == "zenow" and m.created > 1_600_000_000 for m in models.values())
    one = await in_thread(lambda: client.models.retrieve("tiny-embed"))
    assert (one.id, one.model_extra["mode"], one.model_extra["running"]) == ("tiny-embed", "embed", False)
    with pytest.raises(openai.NotFoundError) as caught:
        await in_thread(lambda: client.models.retrieve("no-such-model"))
    assert caught.value.body["code"] == "model_not_found"


async def test_a_name_in_two_modes_resolves_to_llm_first_unless_a_mode_is_asked(nursery, tmp_path, llama_server,
                                                                                smollm2, tiny_models):
    files = {("llm", "shared"): tiny_models["llm"], ("embed", "shared"): tiny_models["embed"]}
    async with serving(nursery, tmp_path / "home", llama_server, smollm2, files) as zenow:
        await check_shared_name(zenow)


async def check_shared_name(zenow):
    load = await zenow.client.post("/api/models/load", json={"model_name": "shared", "mode": "embed"})
    assert load.status_code == 200, load.text
    listed = (await zenow.client.get("/v1/models")).json()["data"]
    assert sorted((m["mode"], m["running"]) for m in listed if m["id"] == "shared") == [
        ("embed", True), ("llm", False)]
    assert (await zenow.client.get("/v1/models/shared")).json()["mode"] == "llm"
    asked = (await zenow.client.get("/v1/models/shared", params={"mode": "embed"})).json()
    assert (asked["mode"], asked["running"]) == ("embed", True)
    assert (await zenow.client.get("/v1/models/shared", params={"mode": "rerank"})).status_code == 404
    assert (await zenow.client.get("/v1/models/shared", params={"mode": "chat"})).status_code == 400


async def test_streamed_deltas_join_to_the_whole_answer_and_usage_comes_when_asked(zenow):
    client = sdk(zenow)
    whole = await in_thread(lambda: client.chat.completions.create(
        model=SMOL, messages=QUESTION, temperature=0, max_tokens=40))
    answer = whole.choices[0].message.content
    assert "Paris" in answer and whole.model == SMOL and whole.object == "chat.completion"
    assert whole.usage.completion_tokens > 3 and whole.usage.total_tokens == (
        whole.usage.prompt_tokens + whole.usage.completion_tokens)

    chunks = await in_thread(lambda: list(client.chat.completions.create(
        messages=QUESTION, temperature=0, max_tokens=40, stream=True, model=SMOL,
        stream_options={"include_usage": True})))
    assert all(c.object == "chat.completion.chunk" and c.model == SMOL for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason

    # no model named (the SDK insists on one; httpx does not): the running one answers
    async with zenow.client.stream("POST", "/v1/chat/completions", json={
            "messages": QUESTION, "temperature": 0, "max_tokens": 40, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join([text async for text in response.aiter_text()])
    assert raw.endswith("\n\ndata: [DONE]\n\n")
    unasked = [json.loads(event[6:]) for event in raw.split("\n\n")[:-2]]
    assert all(event["model"] == SMOL and "usage" not in event for event in unasked)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in unasked) == answer
    sessions = (await zenow.client.get("/api/sessions")).json()
    assert sessions["total"] == 0  # stateless: nothing was written


async def test_the_requests_options_reach_llama_server(zenow):
    client = sdk(zenow)
    short = await in_thread(lambda: client.chat.completions.create(
        model=SMOL, messages=QUESTION, temperature=0, max_completion_tokens=3, seed=1, top_p=0.9,
        presence_penalty=0.1, frequency_penalty=0.1))
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    first = await in_thread(lambda: client.chat.completions.create(
        model=SMOL, messages=QUESTION, temperature=0, max_tokens=40))
    word = first.choices[0].message.content.split()[1]
    stopped = await in_thread(lambda: client.chat.completions.create(
        model=SMOL, messages=QUESTION, temperature=0, max_tokens=40, stop=[word]))
    assert stopped.choices[0].message.content == first.choices[0].message.content.split(word)[0]
    assert stopped.choices[0].finish_reason == "stop"


async def test_the_llm_parameters_are_the_defaults_where_the_request_is_silent(zenow):
    client = sdk(zenow)
    changed = await zenow.client.post("/api/models/update_param", json={"max_tokens": 4, "temperature": 0})
    assert changed.status_code == 200
    answer = await in_thread(lambda: client.chat.completions.create(model=SMOL, messages=QUESTION))
    assert answer.usage.completion_tokens == 4 and answer.choices[0].finish_reason == "length"
    more = await in_thread(lambda: client.chat.completions.create(model=SMOL, messages=QUESTION, max_tokens=6))
    assert more.usage.completion_tokens == 6


async def test_embeddings_for_a_list_of_inputs_as_float_and_base64(zenow):
    client = sdk(zenow)
    texts = ["a cat sits on the mat", "stock market crash", "hello"]
    floats = await in_thread(lambda: client.embeddings.create(model="tiny-embed", input=texts,
                                                              encoding_format="float"))
    assert floats.model == "tiny-embed" and [d.index for d in floats.data] == [0, 1, 2]
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (3, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # normalize is on by default
    assert floats.usage.prompt_tokens > 0 and floats.usage.total_tokens == floats.usage.prompt_tokens

    decoded = await in_thread(lambda: client.embeddings.create(model="tiny-embed", input=texts))  # SDK asks base64
    assert np.array_equal(np.array([d.embedding for d in decoded.data]), vectors.astype(np.float32))
    raw = (await zenow.client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})).json()
    bytes_ = base64.b64decode(raw["data"][0]["embedding"])
    assert np.allclose(struct.unpack(f"<{len(bytes_) // 4}f", bytes_), vectors[2], atol=1e-6)

    single = await in_thread(lambda: client.embeddings.create(model="tiny-embed", input="hello",
                                                              encoding_format="float"))
    assert np.allclose(single.data[0].embedding, vectors[2], atol=1e-6)
    async with httpx.AsyncClient(auth=child_auth()) as direct:  # token arrays, as llama-server takes them
        endpoint = (await status_endpoint(zenow, "embed"))
        ids = (await direct.post(f"{endpoint}/tokenize", json={"content": "hello", "add_special": True})).json()
    tokens = await in_thread(lambda: client.embeddings.create(model="tiny-embed", input=[ids["tokens"]],
                                                              encoding_format="float"))
    assert np.allclose(tokens.data[0].embedding, vectors[2], atol=1e-6)


async def status_endpoint(zenow, mode: str) -> str:
    """The llama-server child's URL, from its command line (zenow does not publish it)."""
    import os

    from tests.support.llama import cmdline, llama_children

    flag = {"llm": "llm", "embed": "--embedding", "rerank": "--reranking"}[mode]
    (pid,) = llama_children(os.getpid(), flag)
    argv = cmdline(pid)
    return f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"


async def test_the_embed_parameters_normalize_and_truncate_apply(zenow):
    client = zenow.client

    async def embed(text: Any) -> httpx.Response:
        return await client.post("/v1/embeddings", json={"model": "tiny-embed", "input": text})

    normalized = np.array((await embed("a cat")).json()["data"][0]["embedding"])
    assert (await client.post("/api/models/update_param?mode=embed", json={"normalize": False})).status_code == 200
    raw = np.array((await embed("a cat")).json()["data"][0]["embedding"])
    assert abs(np.linalg.norm(raw) - 1.0) > 0.01
    assert np.allclose(raw / np.linalg.norm(raw), normalized, atol=1e-5)

    # the tiny BERT takes 512 tokens ([CLS] + 510 + [SEP]): longer inputs lose their tail
    long_answer = await embed("a " * 2000)
    assert long_answer.status_code == 200, long_answer.text
    assert long_answer.json()["usage"]["prompt_tokens"] == 512
    at_the_limit = (await embed("a " * 510)).json()
    assert at_the_limit["usage"]["prompt_tokens"] == 512
    assert np.allclose(long_answer.json()["data"][0]["embedding"], at_the_limit["data"][0]["embedding"], atol=1e-6)
    mixed = (await embed(["a " * 2000, "a cat"])).json()
    assert np.allclose(mixed["data"][1]["embedding"], raw, atol=1e-6)

    assert (await client.post("/api/models/update_param?mode=embed", json={"truncate": False})).status_code == 200
    refused = await embed(["a cat", "a " * 2000])
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "input"
    assert refused.json()["error"]["code"] == "context_length_exceeded"


async def test_rerank_is_best_first_with_index_score_top_n_and_documents(zenow):
    client = zenow.client
    documents = ["a cat sits on the mat", {"text": "the stock market fell"}, "kittens", "paris is in france"]
    texts = [d if isinstance(d, str) else d["text"] for d in documents]
    every = await client.post("/v1/rerank", json={"model": "tiny-rerank", "query": "cat", "documents": documents})
    assert every.status_code == 200, every.text
    body = every.json()
    assert body["model"] == "tiny-rerank" and body["object"] == "list" and body["usage"]["total_tokens"] > 0
    scores = [r["relevance_score"] for r in body["results"]]
    assert sorted(r["index"] for r in body["results"]) == [0, 1, 2, 3] and scores == sorted(scores, reverse=True)
    assert all("document" not in r for r in body["results"])

    best = await client.post("/v1/reranking", json={"query": "cat", "documents": documents, "top_n": 2,
                                                    "return_documents": True})
    results = best.json()["results"]
    assert [r["index"] for r in results] == [r["index"] for r in body["results"][:2]]
    assert [r["relevance_score"] for r in results] == pytest.approx(scores[:2], abs=1e-4)
    assert [r["document"]["text"] for r in results] == [texts[r["index"]] for r in results]

    empty = await client.post("/v1/rerank", json={"query": "cat", "documents": []})
    assert empty.status_code == 400
    assert empty.json()["error"]["param"] == "documents" and empty.json()["error"]["type"] == "invalid_request_error"


async def test_errors_come_in_openai_shape_with_the_right_status(zenow):
    client = sdk(zenow)
    with pytest.raises(openai.BadRequestError) as other_mode:
        await in_thread(lambda: client.chat.completions.create(model="tiny-embed", messages=QUESTION))
    assert other_mode.value.status_code == 400 and other_mode.value.param == "model"
    assert other_mode.value.code == "model_mode_mismatch" and "tiny-embed" in other_mode.value.message
    with pytest.raises(openai.BadRequestError) as other_mode:
        await in_thread(lambda: client.embeddings.create(model=SMOL, input="x"))
    assert other_mode.value.param == "model"
    with pytest.raises(openai.NotFoundError) as unknown:
        await in_thread(lambda: client.chat.completions.create(model="gpt-4o", messages=QUESTION))
    assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    with pytest.raises(openai.BadRequestError) as too_many:
        await in_thread(lambda: client.chat.completions.create(model=SMOL, messages=QUESTION,
                                                               max_completion_tokens=2_000_000))
    assert too_many.value.param == "max_completion_tokens"
    with pytest.raises(openai.BadRequestError) as empty:
        await in_thread(lambda: client.chat.completions.create(model=SMOL, messages=[]))
    assert empty.value.param == "messages"

    malformed = await zenow.client.post("/v1/chat/completions", content=b'{"messages": [',
                                        headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400
    assert set(malformed.json()["error"]) == {"message", "type", "param", "code"}
    assert (await zenow.client.post("/v1/embeddings", json=["not", "an", "object"])).status_code == 400
    nothing_runs = await zenow.client.post("/v1/embeddings", json={"input": "x"})  # embed runs no model; none named
    assert nothing_runs.status_code == 503
    assert nothing_runs.json()["error"]["code"] == "model_not_loaded"


async def test_naming_another_llm_model_loads_it_and_answers(zenow):
    client = sdk(zenow)
    answer = await in_thread(lambda: client.chat.completions.create(
        model="tiny-llama", messages=QUESTION, max_tokens=5, temperature=0))
    assert answer.model == "tiny-llama" and answer.usage.completion_tokens == 5
    now = await status(zenow.client)
    assert (now["status"], now["model_name"]) == ("running", "tiny-llama")
    running = {m["id"]: m["running"] for m in (await zenow.client.get("/v1/models")).json()["data"]}
    assert running[SMOL] is False and running["tiny-llama"] is True
    back = await in_thread(lambda: client.chat.completions.create(
        model=SMOL, messages=QUESTION, max_tokens=40, temperature=0))
    assert back.model == SMOL and "Paris" in back.choices[0].message.content
    assert (await status(zenow.client))["model_name"] == SMOL

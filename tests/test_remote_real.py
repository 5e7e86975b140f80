"""The llm mode bound to a second real llama-server, started by the test with its own
`--api-key`, as the mode's remote backend (`backend_url`)."""

from __future__ import annotations

import os

import numpy as np
import openai
import pytest
import trio

from tests.support.harness import create_session, make_settings, start_zenow, wait_status
from tests.support.llama import cmdline, llama_children
from tests.support.minilm import minilm_gguf
from tests.support.remote import chat_text, remote_server

pytestmark = pytest.mark.real_llama

KEY = "remote-llama-key-4f9a"
ASK = {"temperature": 0, "seed": 7, "max_tokens": 16}


def local_children() -> list[int]:
    """zenow's own llama-server children (the remote has `--api-key` on its command line)."""
    return [pid for pid in llama_children(os.getpid()) if "--api-key" not in cmdline(pid)]


def v1_chat(url: str, model: str) -> str:
    """A whole and a streamed answer through the openai client (greedy: the same text); the text."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    ask = {"model": model, "messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0,
           "seed": 7, "max_tokens": 8}
    answer = client.chat.completions.create(**ask)
    assert answer.model == model
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        **ask, stream=True) if chunk.choices)
    assert streamed == answer.choices[0].message.content
    return streamed


async def chat(client, session_id: int, text: str) -> str:
    async with client.stream("POST", "/api/chat", json={
            "session_id": session_id, "stream": True, "messages": [{"role": "user", "content": text}], **ASK,
    }) as response:
        assert response.status_code == 200
        return chat_text((await response.aread()).decode())


async def test_the_llm_mode_served_by_a_remote_llama_server(nursery, tmp_path, llama_server, smollm2):
    settings = make_settings(tmp_path / "home", llama_server=llama_server, default_llm=smollm2,
                             backend_check_interval=0.3)
    remote_argv = [llama_server, "-m", str(smollm2), "-c", "2048", "-np", "1", "-t", "1", "--no-webui",
                   "--alias", "smol-remote"]
    async with remote_server(remote_argv, KEY) as remote, start_zenow(nursery, settings) as zenow:
        client = zenow.client
        await wait_status(client, "running")
        assert len(local_children()) == 1

        update = await client.post("/api/models/update_param", params={"mode": "llm"},
                                   json={"backend_url": remote.url, "backend_api_key": KEY})
        assert update.status_code == 200 and update.json()["requires_restart"] is True
        status = await wait_status(client, "running")
        assert status["backend_url"] == remote.url and status["model_path"] == remote.url
        assert status["model_name"] == "smol-remote" and status["token_counting"] == "tokenize"
        assert local_children() == []  # no child of zenow's own while the remote serves

        # /api/chat streams from the remote; the history stays in zenow
        sid = (await create_session(client, "colours"))["session_id"]
        reply = await chat(client, sid, "Name three colours.")
        assert reply.strip()
        stored = (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
        assert [(m["role"], m["content"]) for m in stored] == [("user", "Name three colours."), ("assistant", reply)]
        assert stored[0]["token_count"] > 0 and stored[1]["token_count"] > 0
        assert await chat(client, sid, "And one more?")  # the second turn sends the stored history
        assert len((await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]) == 4

        # /v1 through the openai client
        assert (await trio.to_thread.run_sync(v1_chat, zenow.url, "smol-remote")).strip()

        # the remote stops: error, and a clear 503 on chat
        await remote.stop()
        status = await wait_status(client, "error")
        assert remote.url in status["error_message"] and "cannot be reached" in status["error_message"]
        refused = await client.post("/api/chat", json={"session_id": sid, "messages": [
            {"role": "user", "content": "Still there?"}], **ASK})
        assert refused.status_code == 503
        assert remote.url in refused.json()["detail"] and "cannot be reached" in refused.json()["detail"]
        v1 = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert v1.status_code == 503 and v1.json()["error"]["code"] == "backend_unavailable"
        assert len((await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]) == 4  # nothing stored

        # it comes back: running again, and chat works
        await remote.start()
        await wait_status(client, "running", timeout=30)
        assert await chat(client, sid, "Name a fruit.")

        # clearing the URL starts the local child again
        cleared = await client.post("/api/models/update_param", params={"mode": "llm"}, json={"backend_url": ""})
        assert cleared.status_code == 200 and cleared.json()["requires_restart"] is True
        status = await wait_status(client, "running")
        assert status["model_path"] == str(smollm2) and "backend_url" not in status
        assert len(local_children()) == 1
        assert await chat(client, sid, "Name an animal.")


def v1_embed(url: str, texts: list[str]) -> np.ndarray:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.embeddings.create(model="minilm-remote", input=texts)
    assert answer.model == "minilm-remote"
    return np.array([row.embedding for row in answer.data])


async def test_the_embed_mode_served_by_a_remote_llama_server(nursery, tmp_path, llama_server):
    settings = make_settings(tmp_path / "home", llama_server=llama_server, backend_check_interval=0.3)
    remote_argv = [llama_server, "-m", str(minilm_gguf()), "--embedding", "-t", "1", "--no-webui",
                   "--alias", "minilm-remote"]
    async with remote_server(remote_argv, KEY) as remote, start_zenow(nursery, settings) as zenow:
        update = await zenow.client.post("/api/models/update_param", params={"mode": "embed"},
                                         json={"backend_url": remote.url, "backend_api_key": KEY})
        assert update.status_code == 200
        status = await wait_status(zenow.client, "running", "embed")
        assert status["model_name"] == "minilm-remote" and status["backend_url"] == remote.url
        cat, kitten, crash = await trio.to_thread.run_sync(
            v1_embed, zenow.url, ["a cat sits on the mat", "a kitten is on the rug", "stock market crash"])
        assert cat.shape == (384,)
        assert float(cat @ kitten) > float(cat @ crash) + 0.3

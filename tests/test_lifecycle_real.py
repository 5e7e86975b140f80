"""Idle unload and metrics against the real llama-server with SmolLM2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import make_settings, start_zenow, status, wait_for, wait_status
from tests.support.llama import alive, llama_children

pytestmark = pytest.mark.real_llama

SMOL = "SmolLM2-135M-Instruct.Q4_1"


def place_smollm2(home: Path, smollm2: Path) -> None:
    """SmolLM2 in the home's llm folder (a link: the file is 98 MB), so its child's command line names the home."""
    folder = home / "models" / "llm"
    folder.mkdir(parents=True)
    (folder / smollm2.name).symlink_to(smollm2)


def processes_naming(text: str) -> list[int]:
    """Live processes (not zombies) whose command line contains `text`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in argv and state != "Z":
            found.append(int(entry))
    return found


async def chat(client: httpx.AsyncClient, session_id: int, text: str, max_tokens: int) -> tuple[str, float, float]:
    """Stream one chat; return its reply, the seconds to its first delta and to its end."""
    started = trio.current_time()
    first = None
    parts = []
    async with client.stream("POST", "/api/chat", json={
        "session_id": session_id, "stream": True, "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": text}],
    }) as response:
        assert response.status_code == 200, await response.aread()
        raw = ""
        async for chunk in response.aiter_text():
            if first is None and '"content"' in chunk:
                first = trio.current_time() - started
            raw += chunk
    assert raw.endswith("data: [DONE]\n\n"), raw[-300:]
    for event in raw.split("\n\n")[:-2]:
        delta = json.loads(event.removeprefix("data: "))["choices"][0].get("delta", {})
        parts.append(delta.get("content") or "")
    assert first is not None
    return "".join(parts), first, trio.current_time() - started


async def scrape(client: httpx.AsyncClient, **kwargs) -> dict[str, list]:
    """`GET /metrics` parsed: every sample by its name."""
    answer = await client.get("/metrics", **kwargs)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    matching = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (name, labels, samples.get(name))
    return float(matching[0])


async def watch_statuses(client: httpx.AsyncClient, seen: list[str], done: trio.Event) -> None:
    while not done.is_set():
        seen.append((await status(client))["status"])
        await trio.sleep(0.01)


async def test_an_idle_llm_server_stops_and_the_next_chat_starts_it_again(nursery, tmp_path, llama_server, smollm2):
    home = tmp_path / "home"
    place_smollm2(home, smollm2)
    async with start_zenow(nursery, make_settings(home, llama_server=llama_server)) as zenow:
        client = zenow.client
        assert (await client.get("/api/models/get_param")).json()["keep_alive"] == -1  # forever unless asked
        loaded = await client.post("/api/models/load", json={"model_name": SMOL})
        assert loaded.status_code == 200, loaded.text
        (first_child,) = llama_children(os.getpid(), "llm")
        sid = (await client.post("/api/sessions", json={"first_message": "hi"})).json()["session_id"]
        await chat(client, sid, "Say hello.", 8)
        before = await scrape(client)

        updated = await client.post("/api/models/update_param", json={"keep_alive": 2})
        assert updated.status_code == 200 and updated.json()["requires_restart"] is False
        changed = trio.current_time()
        stopped = await wait_status(client, "stopped", timeout=30)
        assert trio.current_time() - changed >= 1.9  # the change reset the timer
        path = str(home / "models" / "llm" / smollm2.name)
        assert stopped == {"status": "stopped", "model_name": SMOL, "model_path": path, "is_running": False,
                           "error_message": None, "reason": "idle"}

        async def child_gone():
            return not alive(first_child)

        await wait_for(child_gone, timeout=10, what="the idle child to exit")
        assert llama_children(os.getpid()) == [] and processes_naming(str(home)) == []
        current = (await client.get("/api/models/current")).json()
        assert current["name"] == SMOL  # still the mode's model

        seen: list[str] = []
        done = trio.Event()
        nursery.start_soon(watch_statuses, client, seen, done)
        reply, first_token, _ = await chat(client, sid, "What is the capital of France?", 24)  # no other call
        done.set()
        assert reply.strip()
        assert "starting" in seen and seen[-1] == "running"
        (second_child,) = llama_children(os.getpid(), "llm")
        assert second_child != first_child
        messages = (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2 and messages[-1]["content"] == reply

        after = await scrape(client)

        def grew(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        assert grew("zenow_server_idle_stops_total", mode="llm") == 1
        assert grew("zenow_server_starts_total", mode="llm") == 1
        restart = grew("zenow_server_start_seconds_sum", mode="llm")
        assert grew("zenow_chat_time_to_first_token_seconds_count") == 1
        ttft = grew("zenow_chat_time_to_first_token_seconds_sum")
        assert restart > 0.05 and ttft >= restart  # its time to first token includes the restart
        assert first_token >= restart


async def test_a_stream_longer_than_keep_alive_is_not_cut_and_concurrent_v1_requests_wake_the_server(
        nursery, tmp_path, llama_server, smollm2):
    home = tmp_path / "home"
    place_smollm2(home, smollm2)
    async with start_zenow(nursery, make_settings(home, llama_server=llama_server)) as zenow:
        client = zenow.client
        assert (await client.post("/api/models/load", json={"model_name": SMOL})).status_code == 200
        assert (await client.post("/api/models/update_param", json={"keep_alive": 1})).status_code == 200
        (child,) = llama_children(os.getpid(), "llm")
        sid = (await client.post("/api/sessions", json={"first_message": "count"})).json()["session_id"]
        seen: list[str] = []
        done = trio.Event()
        nursery.start_soon(watch_statuses, client, seen, done)
        reply, _, lasted = await chat(client, sid, "Write a long story about a dragon who learns to fly.", 600)
        done.set()
        assert lasted > 1.5, (f"the stream lasted {lasted:.2f} s: too short to show anything", reply)
        assert set(seen) == {"running"} and alive(child)  # never stopped under the stream
        messages = (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
        assert messages[-1]["content"] == reply

        stopped = await wait_status(client, "stopped", timeout=30)
        assert stopped["reason"] == "idle"
        answers = []

        async def ask() -> None:
            answers.append(await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "temperature": 0}))

        async with trio.open_nursery() as both:  # two requests at once: both wait for the one restart
            both.start_soon(ask)
            both.start_soon(ask)
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"]
        assert (await status(client))["status"] == "running" and len(llama_children(os.getpid(), "llm")) == 1


async def test_metrics_show_a_chat_and_the_llama_server_figures(nursery, tmp_path, llama_server, smollm2):
    home = tmp_path / "home"
    place_smollm2(home, smollm2)
    key = {"Authorization": "Bearer s3cret"}
    settings = make_settings(home, llama_server=llama_server, api_keys=("s3cret",))
    async with start_zenow(nursery, settings) as zenow:
        client = zenow.client
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.post("/api/models/load", json={"model_name": SMOL}, headers=key)).status_code == 200
        before = await scrape(client, headers=key)
        sid = (await client.post("/api/sessions", json={"first_message": "hi"}, headers=key)).json()["session_id"]
        client.headers.update(key)
        reply, _, _ = await chat(client, sid, "What is the capital of France?", 16)
        assert reply.strip()
        after = await scrape(client)

    tokens = value(after, "zenow_chat_tokens_generated_total") - value(before, "zenow_chat_tokens_generated_total")
    assert 1 <= tokens <= 16
    assert value(after, "zenow_chat_time_to_first_token_seconds_count") == \
        value(before, "zenow_chat_time_to_first_token_seconds_count") + 1
    assert value(after, "zenow_chat_streams_open") == 0
    assert value(after, "zenow_server_state", mode="llm", zenow_server_state="running") == 1
    assert value(after, "zenow_server_state", mode="embed", zenow_server_state="not_started") == 1
    assert value(after, "zenow_llama_server_metrics_up", mode="llm") == 1
    assert value(after, "zenow_llama_server_metrics_up", mode="embed") == 0
    # llama-server's own figures, labelled with the mode: this chat's tokens are among them
    predicted = value(after, "llamacpp:tokens_predicted_total", mode="llm")
    assert predicted >= tokens
    assert value(after, "llamacpp:prompt_tokens_total", mode="llm") > 0
    chats = value(after, "zenow_http_requests_total", method="POST", route="/api/chat", status="200")
    assert chats >= 1
    assert value(after, "zenow_http_requests_total", method="GET", route="/metrics", status="401") >= 1
    assert value(after, "zenow_store_query_seconds_count", query="add_message") >= 2

"""Server actors against the real llama-server: SmolLM2 and tiny generated GGUF models."""

from __future__ import annotations

import os
import random
import shutil
import signal

import httpx
import pytest
import trio

from tests.support.harness import make_settings, spawn_zenow, start_zenow, status, wait_for, wait_status
from tests.support.llama import alive, child_auth, cmdline, context_per_slot, llama_children
from tests.support.tiny_models import write_stub_model

pytestmark = pytest.mark.real_llama


def place(home, mode, source):
    """Put a model file into the home's models/<mode>/ folder, as a user would."""
    folder = home / "models" / mode
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.copy(source, folder / source.name)


def child_port(pid):
    argv = cmdline(pid)
    return int(argv[argv.index("--port") + 1])


def the_child(mode):
    pids = llama_children(os.getpid(), mode)
    assert len(pids) == 1, pids
    return pids[0]


async def test_all_three_modes_run_at_once(nursery, tmp_path, llama_server, smollm2, tiny_models):
    home = tmp_path / "home"
    place(home, "embed", tiny_models["embed"])
    place(home, "rerank", tiny_models["rerank"])
    settings = make_settings(home, llama_server=llama_server, default_llm=smollm2)
    async with start_zenow(nursery, settings) as zenow:
        client = zenow.client
        running = await wait_status(client, "running", "llm")
        assert running["model_name"] == smollm2.stem and running["is_running"] is True
        assert running["error_message"] is None
        for mode, name in (("embed", "tiny-bert-embed"), ("rerank", "tiny-bert-rerank")):
            assert (await status(client, mode))["status"] == "not_started"
            update = await client.post("/api/models/update_param", params={"mode": mode}, json={"context_size": 512})
            assert update.json()["success"] is True
            loaded = await client.post("/api/models/load", json={"model_name": name, "mode": mode})
            assert loaded.status_code == 200, loaded.text
            assert loaded.json() == {
                "success": True, "message": "Model loaded successfully", "model_name": name,
                "model_path": str(home / "models" / mode / f"{name}.gguf"), "server_status": "running",
            }
        for mode in ("llm", "embed", "rerank"):
            assert (await status(client, mode))["status"] == "running"

        # each child really serves its own mode
        async with httpx.AsyncClient(timeout=30, auth=child_auth()) as direct:
            embed = await direct.post(f"http://127.0.0.1:{child_port(the_child('--embedding'))}/v1/embeddings",
                                      json={"input": ["a cat sits on the mat"]})
            assert len(embed.json()["data"][0]["embedding"]) == 64
            rerank = await direct.post(f"http://127.0.0.1:{child_port(the_child('--reranking'))}/v1/rerank",
                                       json={"query": "panda", "documents": ["a bear", "a car"]})
            assert len(rerank.json()["results"]) == 2
            chat = await direct.post(f"http://127.0.0.1:{child_port(the_child('llm'))}/v1/chat/completions",
                                     json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
            assert chat.json()["choices"][0]["message"]["role"] == "assistant"

        listed = (await client.get("/api/models/list")).json()
        assert {m["name"] for m in listed["models"]} == {smollm2.stem, "tiny-bert-embed", "tiny-bert-rerank"}
        assert listed["current_model"]["name"] == smollm2.stem
        embed_list = (await client.get("/api/models/list", params={"mode": "embed"})).json()
        assert [m["name"] for m in embed_list["models"]] == ["tiny-bert-embed"]
        assert embed_list["current_model"]["is_downloaded"] is True
        current = (await client.get("/api/models/current", params={"mode": "rerank"})).json()
        assert current["name"] == "tiny-bert-rerank" and current["mode"] == "rerank"
    assert llama_children(os.getpid()) == []  # shutdown reaped every child


async def test_switching_the_llm_model_replaces_the_child(nursery, tmp_path, llama_server, smollm2, tiny_models):
    home = tmp_path / "home"
    place(home, "llm", tiny_models["llm"])
    async with start_zenow(nursery, make_settings(home, llama_server=llama_server, default_llm=smollm2)) as zenow:
        await wait_status(zenow.client, "running", "llm")
        first = the_child("llm")
        loaded = await zenow.client.post("/api/models/load", json={"model_name": "tiny-llama"})
        assert loaded.json()["model_name"] == "tiny-llama"
        second = the_child("llm")
        assert second != first and not alive(first)
        assert str(home / "models" / "llm" / "tiny-llama.gguf") in cmdline(second)
        assert (await zenow.client.get("/api/models/current")).json()["name"] == "tiny-llama"


async def test_a_server_parameter_restarts_the_server_and_a_client_one_does_not(
        nursery, tmp_path, llama_server, smollm2):
    settings = make_settings(tmp_path / "home", llama_server=llama_server, default_llm=smollm2)
    async with start_zenow(nursery, settings) as zenow:
        client = zenow.client
        await wait_status(client, "running", "llm")
        before = the_child("llm")
        answer = await client.post("/api/models/update_param", params={"mode": "llm"}, json={"context_size": 1024})
        assert answer.json() == {
            "success": True, "message": "Parameters updated successfully", "requires_restart": True}
        after = the_child("llm")
        assert after != before and not alive(before)
        argv = cmdline(after)
        assert context_per_slot(argv) == 1024
        assert (await status(client))["status"] == "running"

        client_only = await client.post("/api/models/update_param", json={"temperature": 0.2, "max_tokens": 64})
        assert client_only.json()["requires_restart"] is False
        assert the_child("llm") == after
        params = (await client.get("/api/models/get_param")).json()
        assert params["temperature"] == 0.2 and params["max_tokens"] == 64 and params["context_size"] == 1024
        assert params["repeat_penalty"] == 1.1  # untouched keys keep their values


async def test_models_and_parameters_come_back_after_a_restart_of_zenow(
        nursery, tmp_path, llama_server, smollm2, tiny_models):
    home = tmp_path / "home"
    place(home, "llm", tiny_models["llm"])
    place(home, "embed", tiny_models["embed"])
    settings = make_settings(home, llama_server=llama_server, default_llm=smollm2)
    async with start_zenow(nursery, settings) as zenow:
        await wait_status(zenow.client, "running", "llm")
        await zenow.client.post("/api/models/update_param", params={"mode": "embed"}, json={"context_size": 256})
        await zenow.client.post("/api/models/load", json={"model_name": "tiny-bert-embed", "mode": "embed"})
        await zenow.client.post("/api/models/load", json={"model_name": "tiny-llama"})
        await zenow.client.post("/api/models/update_param", json={"temperature": 1.5})
    assert llama_children(os.getpid()) == []

    # --default-llm does not replace a home's current model
    async with start_zenow(nursery, settings) as zenow:
        llm = await wait_status(zenow.client, "running", "llm")
        assert llm["model_name"] == "tiny-llama"
        embed = await wait_status(zenow.client, "running", "embed")
        assert embed["model_name"] == "tiny-bert-embed"
        assert (await zenow.client.get("/api/models/get_param", params={"mode": "embed"})).json()["context_size"] == 256
        assert (await zenow.client.get("/api/models/get_param")).json()["temperature"] == 1.5
        assert (await status(zenow.client, "rerank"))["status"] == "not_started"


async def test_without_a_default_a_fresh_home_starts_with_nothing(nursery, tmp_path, llama_server):
    async with start_zenow(nursery, make_settings(tmp_path / "home", llama_server=llama_server)) as zenow:
        for mode in ("llm", "embed", "rerank"):
            assert await status(zenow.client, mode) == {
                "status": "not_started", "model_name": None, "model_path": None,
                "is_running": False, "error_message": None,
            }
        assert (await zenow.client.get("/api/models/list")).json() == {"models": [], "current_model": None}
        assert (await zenow.client.get("/api/models/current")).status_code == 404
        assert llama_children(os.getpid()) == []


async def test_the_child_lives_as_long_as_zenow_and_dies_with_it(nursery, tmp_path, llama_server, smollm2):
    """The child must survive trio's idle worker threads (>10 s) and die within 1 s of SIGKILL."""
    zenow = await spawn_zenow(nursery, tmp_path / "home", "--default-llm", str(smollm2),
                              env={"ZENOW_LLAMA_SERVER": llama_server})
    async with httpx.AsyncClient(base_url=zenow.url, timeout=30) as client:
        await wait_status(client, "running", "llm")
        (child,) = llama_children(zenow.process.pid)
        started = trio.current_time()
        async with httpx.AsyncClient(timeout=5, auth=child_auth()) as direct:
            while trio.current_time() - started < 62:
                assert alive(child), "llama-server died while zenow lives"
                health = await direct.get(f"http://127.0.0.1:{child_port(child)}/health")
                assert health.status_code == 200
                await trio.sleep(0.25)
        assert (await status(client))["status"] == "running"
    zenow.process.send_signal(signal.SIGKILL)
    await zenow.process.wait()

    async def gone():
        return not alive(child)

    await wait_for(gone, timeout=1.0, interval=0.02, what="the child to die with zenow")


async def test_a_broken_model_file_never_costs_the_mode_its_running_model(nursery, tmp_path, llama_server, tiny_models):
    home = tmp_path / "home"
    place(home, "embed", tiny_models["embed"])
    broken = home / "models" / "embed" / "broken.gguf"
    shutil.copy(tiny_models["embed"], broken)  # registered at start (a broken header is refused there)...
    write_stub_model(home / "models" / "embed" / "hollow.gguf")  # a whole header, no model behind it
    async with start_zenow(nursery, make_settings(home, llama_server=llama_server)) as zenow:
        client = zenow.client
        broken.write_bytes(b"GGUF" + random.Random(3).randbytes(4096))  # ...then broken: the magic, then garbage
        await client.post("/api/models/update_param", params={"mode": "embed"}, json={"context_size": 512})
        loaded = await client.post("/api/models/load", json={"model_name": "tiny-bert-embed", "mode": "embed"})
        assert loaded.status_code == 200, loaded.text
        serving = the_child("--embedding")

        refused = await client.post("/api/models/load", json={"model_name": "broken", "mode": "embed"})
        assert refused.status_code == 400
        assert refused.json()["detail"].startswith(f"Broken GGUF model file {broken}: unsupported GGUF version")
        assert the_child("--embedding") == serving  # never touched

        failed = await client.post("/api/models/load", json={"model_name": "hollow", "mode": "embed"})
        assert failed.status_code == 500
        detail = failed.json()["detail"]
        assert detail.startswith("llama-server exited during startup with code 1: error loading model")
        assert detail.endswith("; tiny-bert-embed, which ran before, is running again")
        assert "\n" not in detail and "0.00." not in detail  # the reason, not the log
        embed = await status(client, "embed")
        assert (embed["status"], embed["model_name"]) == ("running", "tiny-bert-embed")
        current = (await client.get("/api/models/current", params={"mode": "embed"})).json()
        assert current["name"] == "tiny-bert-embed"  # the file that failed is not made current
        async with httpx.AsyncClient(timeout=30, auth=child_auth()) as direct:
            vectors = await direct.post(f"http://127.0.0.1:{child_port(the_child('--embedding'))}/v1/embeddings",
                                        json={"input": ["still serving"]})
        assert len(vectors.json()["data"][0]["embedding"]) == 64


async def test_a_model_starts_with_at_most_the_context_it_was_trained_for(nursery, tmp_path, llama_server, tiny_models):
    home = tmp_path / "home"
    place(home, "llm", tiny_models["llm"])  # trained for 4096 tokens; context_size stays at its 8192 default
    async with start_zenow(nursery, make_settings(home, llama_server=llama_server)) as zenow:
        loaded = await zenow.client.post("/api/models/load", json={"model_name": "tiny-llama"})
        assert loaded.status_code == 200, loaded.text
        argv = cmdline(the_child("llm"))
        assert context_per_slot(argv) == 4096
        assert (await zenow.client.get("/api/models/get_param")).json()["context_size"] == 8192
        refused = await zenow.client.post("/api/models/update_param", json={"context_size": 6000})
        assert refused.status_code == 400 and "4096 tokens tiny-llama was trained for" in refused.json()["detail"]

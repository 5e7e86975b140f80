"""Server actors under faults, with the fake llama-server (tests/support/fake_llama_server.py)."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
import trio

from tests.support.harness import make_settings, spawn_zenow, start_zenow, status, wait_for, wait_status
from tests.support.llama import FAKE_LLAMA_SERVER, alive, llama_children


def gguf(folder, name, body=b"\0" * 64):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.gguf"
    path.write_bytes(b"GGUF" + body)
    return path


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    gguf(home / "models" / "llm", "alpha")
    gguf(home / "models" / "llm", "beta")
    return home


@pytest.fixture
def fake_settings(home):
    return make_settings(home, llama_server=str(FAKE_LLAMA_SERVER), stop_grace=1.0)


async def load(client, name, mode="llm"):
    return await client.post("/api/models/load", json={"model_name": name, "mode": mode})


async def test_a_crashed_child_is_reported_and_restarted(nursery, fake_settings, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_CRASH_AFTER", "0.5")
    async with start_zenow(nursery, fake_settings) as zenow:
        assert (await load(zenow.client, "alpha")).json()["server_status"] == "running"
        first = llama_children(os.getpid())
        error = await wait_status(zenow.client, "error")
        assert "exited unexpectedly with code 3" in error["error_message"]
        assert "GGML_ASSERT" in error["error_message"]  # the child's last lines are kept
        assert error["model_name"] == "alpha" and error["is_running"] is False
        await wait_status(zenow.client, "running")  # restarted by itself, no request needed
        assert llama_children(os.getpid()) != first


async def test_repeated_fast_crashes_stop_the_retries(nursery, home, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_CRASH_AFTER", "0.4")
    settings = make_settings(home, llama_server=str(FAKE_LLAMA_SERVER), restart_backoff=0.05)
    async with start_zenow(nursery, settings) as zenow:
        await load(zenow.client, "alpha")

        async def gave_up():
            current = await status(zenow.client)
            return current if "gave up after 6 failed starts" in (current["error_message"] or "") else None

        final = await wait_for(gave_up, timeout=30, what="the retries to stop")
        assert final["status"] == "error"
        await wait_for(lambda: _no_children(), timeout=5, what="the last child to be reaped")
        assert (await status(zenow.client))["status"] == "error"  # stays down until the next load
        monkeypatch.delenv("FAKE_LLAMA_CRASH_AFTER")
        assert (await load(zenow.client, "alpha")).json()["server_status"] == "running"


async def _no_children():
    return llama_children(os.getpid()) == []


async def test_startup_that_never_gets_healthy_times_out(nursery, home, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_NEVER_READY", "1")
    settings = make_settings(home, llama_server=str(FAKE_LLAMA_SERVER), start_timeout_base=1.0)
    async with start_zenow(nursery, settings) as zenow:
        with trio.fail_after(20):
            answer = await load(zenow.client, "alpha")
        assert answer.status_code == 500
        assert "did not become ready within 1 s" in answer.json()["detail"]
        assert answer.json()["success"] is False  # what the original front end reads
        current = await status(zenow.client)
        assert current["status"] == "error" and "did not become ready" in current["error_message"]
        assert llama_children(os.getpid()) == []  # the hung child was killed and reaped


async def test_a_crash_during_load_is_an_error_a_user_can_act_on(nursery, fake_settings, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_FAIL_START", "7")
    async with start_zenow(nursery, fake_settings) as zenow:
        answer = await load(zenow.client, "alpha")
        assert answer.status_code == 500
        detail = answer.json()["detail"]
        assert "exited during startup with code 7" in detail and "error loading model" in detail
        assert (await status(zenow.client))["status"] == "error"
        assert (await zenow.client.get("/api/models/current")).status_code == 404  # not made current


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"NOTGGUF-a-text-file", "Not a GGUF model file"), (None, "Model file not found")],
)
async def test_a_bad_file_keeps_the_previous_model_running(nursery, fake_settings, home, content, expected):
    bad = gguf(home / "models" / "llm", "bad")  # registered from the folder at start
    async with start_zenow(nursery, fake_settings) as zenow:
        await load(zenow.client, "alpha")
        (running,) = llama_children(os.getpid())
        if content is None:
            bad.unlink()
        else:
            bad.write_bytes(content)
        answer = await load(zenow.client, "bad")
        assert answer.status_code == 400
        assert expected in answer.json()["detail"] and str(bad) in answer.json()["detail"]
        assert (await status(zenow.client))["model_name"] == "alpha"
        assert (await status(zenow.client))["status"] == "running"
        assert llama_children(os.getpid()) == [running]
        listed = (await zenow.client.get("/api/models/list")).json()["models"]
        assert {m["name"]: m["is_downloaded"] for m in listed}["bad"] is (content is not None)


async def test_loads_for_one_mode_are_serialized(nursery, fake_settings, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_START_DELAY", "0.3")
    async with start_zenow(nursery, fake_settings) as zenow:
        answers = {}

        async def load_into(name):
            answers[name] = (await load(zenow.client, name)).json()

        async with trio.open_nursery() as both:
            both.start_soon(load_into, "alpha")
            await trio.sleep(0.05)
            both.start_soon(load_into, "beta")
            starting = await wait_status(zenow.client, "starting")
            assert starting["model_name"] == "alpha"  # status answers at once during a load
        assert answers["alpha"]["server_status"] == answers["beta"]["server_status"] == "running"
        assert (await status(zenow.client))["model_name"] == "beta"
        assert len(llama_children(os.getpid())) == 1


async def test_a_child_ignoring_sigterm_is_killed(nursery, home, monkeypatch):
    monkeypatch.setenv("FAKE_LLAMA_IGNORE_SIGTERM", "1")
    settings = make_settings(home, llama_server=str(FAKE_LLAMA_SERVER), stop_grace=0.3)
    async with start_zenow(nursery, settings) as zenow:
        await load(zenow.client, "alpha")
        (old,) = llama_children(os.getpid())
        assert (await load(zenow.client, "beta")).json()["server_status"] == "running"
        assert not alive(old)
    assert llama_children(os.getpid()) == []


async def test_sigkill_of_zenow_leaves_no_child(nursery, home):
    zenow = await spawn_zenow(nursery, home, "--llama-server", str(FAKE_LLAMA_SERVER))
    async with httpx.AsyncClient(base_url=zenow.url, timeout=30) as client:
        assert (await load(client, "alpha")).json()["server_status"] == "running"
    (child,) = llama_children(zenow.process.pid)
    zenow.process.send_signal(signal.SIGKILL)
    await zenow.process.wait()
    with trio.fail_after(1.0):
        while alive(child):
            await trio.sleep(0.02)


async def test_no_llama_server_is_reported(nursery, home):
    settings = make_settings(home, llama_server=str(home / "no-such-binary"))
    async with start_zenow(nursery, settings) as zenow:
        answer = await load(zenow.client, "alpha")
        assert answer.status_code == 500
        assert "not an executable file" in answer.json()["detail"]
        assert (await status(zenow.client))["error_message"].startswith("Failed to start llama-server")


@pytest.mark.parametrize("path", ["/api/server/status", "/api/models/server_status", "/api/models/current",
                                  "/api/models/get_param", "/api/models/list"])
async def test_an_invalid_mode_is_a_400_listing_the_valid_ones(client, path):
    answer = await client.get(path, params={"mode": "chat"})
    assert answer.status_code == 400
    assert all(m in answer.json()["detail"] for m in ("llm", "embed", "rerank"))


async def test_load_validation(client):
    unknown = await client.post("/api/models/load", json={"model_name": "nope"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    bad_mode = await client.post("/api/models/load", json={"model_name": "x", "mode": "chat"})
    assert bad_mode.status_code == 400 and "llm" in bad_mode.json()["detail"]
    no_name = await client.post("/api/models/load", json={"mode": "llm"})
    assert no_name.status_code == 400 and "model_name" in no_name.json()["detail"]
    traversal = await client.post("/api/models/load", json={"model_name": "../x", "download_url": "http://127.0.0.1:1/x"})
    assert traversal.status_code == 400 and "model_name" in traversal.json()["detail"]


@pytest.mark.parametrize(
    ("mode", "body", "field"),
    [
        ("llm", {"temperature": 2.5}, "temperature"),
        ("llm", {"repeat_penalty": 0.5}, "repeat_penalty"),
        ("llm", {"threads": 0}, "threads"),
        ("llm", {"context_size": -1}, "context_size"),
        ("llm", {"max_tokens": 0}, "max_tokens"),
        ("llm", {"batch_size": "big"}, "batch_size"),
        ("embed", {"temperature": 0.5}, "temperature"),
        ("embed", {"normalize": "yes"}, "normalize"),
        ("rerank", {"wat": 1}, "wat"),
        ("llm", {}, "body"),
    ],
)
async def test_update_param_validation(client, mode, body, field):
    before = (await client.get("/api/models/get_param", params={"mode": mode})).json()
    answer = await client.post("/api/models/update_param", params={"mode": mode}, json=body)
    assert answer.status_code == 400, answer.text
    assert field in answer.json()["detail"]
    assert (await client.get("/api/models/get_param", params={"mode": mode})).json() == before


async def test_parameter_defaults_follow_the_spec(client):
    llm = (await client.get("/api/models/get_param")).json()
    assert {k: llm[k] for k in ("context_size", "gpu_layers", "batch_size", "temperature", "repeat_penalty", "max_tokens")} == {
        "context_size": 8192, "gpu_layers": 0, "batch_size": 512, "temperature": 0.7, "repeat_penalty": 1.1, "max_tokens": 2048,
    }
    assert llm["threads"] >= 1 and llm["system_prompt"]
    embed = (await client.get("/api/models/get_param", params={"mode": "embed"})).json()
    assert set(embed) == {"context_size", "threads", "gpu_layers", "batch_size", "normalize", "truncate"}
    assert embed["normalize"] is True and embed["truncate"] is True
    rerank = (await client.get("/api/models/get_param", params={"mode": "rerank"})).json()
    assert set(rerank) == {"context_size", "threads", "gpu_layers", "batch_size"}


async def test_loading_the_running_model_again_keeps_its_server(nursery, fake_settings):
    async with start_zenow(nursery, fake_settings) as zenow:
        await load(zenow.client, "alpha")
        (child,) = llama_children(os.getpid())
        again = await load(zenow.client, "alpha")
        assert again.json()["server_status"] == "running"
        assert llama_children(os.getpid()) == [child]

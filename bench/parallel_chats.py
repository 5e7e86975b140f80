"""Benchmark 2, parallel chats: N chats at once on different sessions through zenow, and the same N
requests straight to a llama-server with the same flags (the same slot count).

Starts `zenow serve` with SmolLM2 (its llm server has `parallel` slots, 4 by default) and a second
llama-server with the flags zenow gave its own.  For N = 1, 2, 4, 8, each round sends N streamed
chats at once (each its own question, temperature 0, T tokens) to one, then the other (the order
alternates).  Reports total tokens/s and the worst time to first token, with zenow's share of
llama-server's own figures.

    python bench/parallel_chats.py [--counts 1,2,4,8] [--rounds 3] [--tokens 64] [--quick] [--zenow-path DIR]
        [--model GGUF|synthetic]

`--model synthetic`: a random-weight llama about three times slower than SmolLM2 (see chat_overhead).

Targets (issue 11): at least 95 % of llama-server's total tokens/s at every N, worst first token at
most 1.2x llama-server's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from _common import (
    add_model_option,
    add_run_options,
    fmt,
    llama_server_like,
    median,
    p90,
    prefill_count,
    prefilling,
    prefills_done,
    run_and_record,
    table,
    timed_stream,
    zenow_serving_llm,
)

SYSTEM = "You are a helpful assistant."
TOPICS = ["a lighthouse", "a mountain village", "a robot gardener", "a lost cat", "the first snow",
          "a night train", "an old library", "a kite festival"]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as home:
        async with trio.open_nursery() as nursery, zenow_serving_llm(nursery, Path(home), args) as (zenow, http, model):
            await http.post("/api/models/update_param", json={"system_prompt": SYSTEM})
            async with llama_server_like(nursery, zenow) as (baseline, argv):
                results = await measure(args, http, baseline.url)
                results["llama_server_flags"] = " ".join(a for a in argv[3:] if not a.startswith("/"))
                results["model"] = Path(model).name
                return results


async def one_batch(http: Any, path: str, llama_url: str, count: int, tokens: int,
                    prefills: bool = False) -> dict[str, float]:
    """`count` chats at once; with `prefills`, waits for zenow's prefills after them before returning."""
    timings: list[Any] = []

    async def chat(n: int) -> None:
        question = f"Tell me a short story about {TOPICS[n % len(TOPICS)]}."
        if path == "llama-server":
            payload = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                       "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0,
                       "repeat_penalty": 1.1, "max_tokens": tokens}
            timings.append(await timed_stream(http, f"{llama_url}/v1/chat/completions", payload))
        else:
            sid = sessions[n]
            timings.append(await timed_stream(http, "/api/chat", {
                "session_id": sid, "stream": True, "messages": [{"role": "user", "content": question}],
                "temperature": 0.0, "max_tokens": tokens}))

    sessions: list[int] = []
    prefilled = 0.0
    if path != "llama-server":
        prefilled = await prefill_count(http) if prefills else 0.0
        sessions = [(await http.post("/api/sessions", json={"first_message": "bench"})).json()["session_id"]
                    for _ in range(count)]
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(chat, n)
    elapsed = time.perf_counter() - started
    if prefills and path != "llama-server":
        await prefills_done(http, prefilled + count)
    return {"tokens_per_s": sum(t.tokens for t in timings) / elapsed,
            "worst_first_ms": max(t.first for t in timings) * 1000}


async def measure(args: argparse.Namespace, http: Any, llama_url: str) -> dict[str, Any]:
    paths = ["llama-server", "/api/chat"]
    results: dict[str, Any] = {"rounds": args.rounds, "tokens": args.tokens, "counts": {}}
    await one_batch(http, "llama-server", llama_url, 2, 8)  # warm up
    await one_batch(http, "/api/chat", llama_url, 2, 8, prefilling(args))
    for count in args.counts:
        samples: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
        for round_ in range(args.rounds):
            for path in (paths if round_ % 2 == 0 else paths[::-1]):
                samples[path].append(await one_batch(http, path, llama_url, count, args.tokens, prefilling(args)))
        share = [z["tokens_per_s"] / b["tokens_per_s"]
                 for z, b in zip(samples["/api/chat"], samples["llama-server"], strict=True)]
        first = [z["worst_first_ms"] / b["worst_first_ms"]
                 for z, b in zip(samples["/api/chat"], samples["llama-server"], strict=True)]
        results["counts"][str(count)] = {"samples": samples, "share": share, "first_ratio": first}
    return results


def render(results: dict[str, Any]) -> str:
    rows = []
    for count, r in results["counts"].items():
        base, zen = r["samples"]["llama-server"], r["samples"]["/api/chat"]
        rows.append([
            count, fmt(median([s["tokens_per_s"] for s in base]), 1), fmt(median([s["tokens_per_s"] for s in zen]), 1),
            fmt(median(r["share"]) * 100, 1) + " %", fmt(min(r["share"]) * 100, 1) + " %",
            fmt(median([s["worst_first_ms"] for s in base]), 0), fmt(median([s["worst_first_ms"] for s in zen]), 0),
            fmt(median(r["first_ratio"]), 2) + "x", fmt(p90(r["first_ratio"]), 2) + "x",
        ])
    head = (f"Parallel chats: {results['rounds']} alternating rounds, {results['tokens']} tokens each, "
            f"{results.get('model', 'SmolLM2-135M')}, "
            f"llama-server {results.get('llama_server_flags', '')}\n\n")
    return head + table(["chats at once", "llama-server tokens/s", "zenow tokens/s", "zenow share p50", "worst round",
                         "llama-server worst first token ms", "zenow worst first token ms", "ratio p50",
                         "ratio p90"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="N = 1 and 4, one round of 32 tokens")
    add_model_option(parser)
    add_run_options(parser, "parallel_chats")
    args = parser.parse_args()
    args.counts = [int(c) for c in args.counts.split(",")]
    if args.quick:
        args.counts, args.rounds, args.tokens = [1, 4], 1, 32

    run_and_record(args.name, run, render, args)


if __name__ == "__main__":
    main()

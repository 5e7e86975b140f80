"""Benchmark 4, long conversations: time to first token on turns 1-20 of a session whose history is
far over its budget (half the context), against a fresh session's first turn, alternating.

Starts `zenow serve` with SmolLM2 (context_size 2048 per conversation, so the history budget is
1,024 tokens), fills one session with about 3x the budget of stored messages, then for each turn
sends one chat to a fresh session and the next turn to the long one (32 tokens each).  With the
history trimmed in steps (zenow/chat/_prompt.py) the long session's prompt keeps its prefix from
turn to turn, so llama-server reuses its cached tokens and computes only the new ones; at a step
(old messages dropped) it computes the whole history once.  After each reply zenow has llama-server read
the start of the next turn (the reply's end and the next user message's start) into its cache
(`--prefill-next-turn`, on by default; `--zenow-arg=--prefill-next-turn=off` to compare); each chat
follows the previous one after `--pause` seconds, as a user reads a reply before writing, which also
keeps each measured first token clear of the previous chat's prefill.

    python bench/long_conversations.py [--turns 20] [--quick] [--flash-attn auto|on|off] [--zenow-path DIR]
        [--model GGUF|synthetic] [--pause S]

`--model synthetic`: a random-weight llama about three times slower than SmolLM2 (see chat_overhead); its
byte-level tokenizer makes every text about four times as many tokens.

Target (issue 11): turn N of the long session within 1.5x the first-token time of a short one.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from typing import Any

import trio
from _common import (
    add_model_option,
    add_run_options,
    client,
    fmt,
    llama_server_binary,
    llm_model,
    median,
    p90,
    run_and_record,
    start_zenow,
    table,
    timed_stream,
    wait_llm_running,
    zenow_env,
)

CONTEXT = 2048
FILLER = ("In the valley the river turned twice before the old mill, where the miller kept a ledger of "
          "every sack of grain, every traveller and every storm that passed over the hills that year.")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as home:
        async with trio.open_nursery() as nursery:
            model = await trio.to_thread.run_sync(llm_model, args.model, Path(home))  # writes 824 MB for synthetic
            zenow = await start_zenow(nursery, Path(home), "--default-llm", model, *args.zenow_arg,
                                      env=zenow_env(ZENOW_LLAMA_SERVER=llama_server_binary()),
                                      python_path=args.zenow_path)
            try:
                async with client(zenow.url) as http:
                    await wait_llm_running(http)
                    await http.post("/api/models/update_param",
                                    json={"context_size": CONTEXT, "flash_attn": args.flash_attn})
                    await wait_llm_running(http)
                    results = await measure(args, http)
            finally:
                await zenow.stop()
        # what llama-server computed for each prompt (its log is complete once zenow stopped)
        log = (Path(home) / "logs" / "llama-server-llm.log").read_text(errors="replace")
        prompts = {int(task): int(n) for task, n in
                   re.findall(r"task (\d+) \| prompt eval time =\s+[\d.]+ ms /\s+(\d+) tokens", log)}
        generated = {int(task): float(ms) for task, ms in re.findall(r"task (\d+) \|\s+eval time =\s+([\d.]+) ms", log)}
        # in the order of the tasks; a prefill (n_predict 0) generates nothing: its eval time is 0
        computed = [prompts[task] for task in sorted(prompts) if generated.get(task, 1.0) > 0]
        order = [kind for n in range(args.turns) for kind in (("fresh", "long") if n % 2 == 0 else ("long", "fresh"))]
        tail = computed[-len(order):] if len(computed) >= len(order) else []
        results["long_computed_prompt_tokens"] = [c for c, k in zip(tail, order, strict=False) if k == "long"]
        results["fresh_computed_prompt_tokens"] = [c for c, k in zip(tail, order, strict=False) if k == "fresh"]
        results["model"] = Path(model).name
        return results


async def measure(args: argparse.Namespace, http: Any) -> dict[str, Any]:
    long_sid = (await http.post("/api/sessions", json={"first_message": "long"})).json()["session_id"]
    for i in range(args.exchanges):
        await http.post(f"/api/sessions/{long_sid}/messages", json={"role": "user", "content": f"Part {i}: {FILLER}"})
        await http.post(f"/api/sessions/{long_sid}/messages",
                        json={"role": "assistant", "content": f"Noted {i}. {FILLER}"})
    total = (await http.get(f"/api/sessions/{long_sid}")).json()
    stored = total.get("total_tokens")

    async def turn(sid: int, n: int) -> float:
        await trio.sleep(args.pause)
        timed = await timed_stream(http, "/api/chat", {
            "session_id": sid, "stream": True, "temperature": 0.0, "max_tokens": args.tokens,
            "messages": [{"role": "user", "content": f"Question {n}: what happened at the mill next?"}]})
        return timed.first * 1000

    fresh_warm = (await http.post("/api/sessions", json={"first_message": "w"})).json()["session_id"]
    await turn(fresh_warm, 0)
    fresh: list[float] = []
    long: list[float] = []
    for n in range(args.turns):
        sid = (await http.post("/api/sessions", json={"first_message": "short"})).json()["session_id"]
        if n % 2 == 0:
            fresh.append(await turn(sid, n))
            long.append(await turn(long_sid, n))
        else:
            long.append(await turn(long_sid, n))
            fresh.append(await turn(sid, n))
    return {"turns": args.turns, "tokens": args.tokens, "context_size": CONTEXT, "stored_tokens": stored,
            "flash_attn": args.flash_attn, "pause": args.pause, "zenow_args": args.zenow_arg,
            "fresh_first_ms": fresh, "long_first_ms": long,
            "ratio": [lg / fr for lg, fr in zip(long, fresh, strict=True)]}


def render(results: dict[str, Any]) -> str:
    fresh, long, ratio = results["fresh_first_ms"], results["long_first_ms"], results["ratio"]
    long_computed = results.get("long_computed_prompt_tokens") or []
    fresh_computed = results.get("fresh_computed_prompt_tokens") or []
    rows = [[str(n + 1), fmt(f, 0), fmt(lg, 0), fmt(r, 2) + "x",
             str(fresh_computed[n]) if n < len(fresh_computed) else "-",
             str(long_computed[n]) if n < len(long_computed) else "-"]
            for n, (f, lg, r) in enumerate(zip(fresh, long, ratio, strict=True))]
    rows.append(["median", fmt(median(fresh), 0), fmt(median(long), 0), fmt(median(ratio), 2) + "x", "", ""])
    rows.append(["p90", fmt(p90(fresh), 0), fmt(p90(long), 0), fmt(p90(ratio), 2) + "x", "", ""])
    over = sum(r > 1.5 for r in ratio)
    head = (f"Long conversations: context {results['context_size']} per conversation (history budget "
            f"{results['context_size'] // 2}), a session holding {results['stored_tokens']} tokens, "
            f"{results['turns']} turns of {results['tokens']} tokens, {results.get('model', 'SmolLM2-135M')}, "
            f"flash_attn {results.get('flash_attn', 'auto')}, {results.get('pause', 0):g} s between chats"
            f"{', zenow ' + ' '.join(results['zenow_args']) if results.get('zenow_args') else ''}\n\n")
    return head + table(["turn", "fresh session first token ms", "long session first token ms", "ratio",
                         "fresh: prompt tokens computed", "long: prompt tokens computed"], rows) + (
        f"\n\nturns over 1.5x: {over} of {len(ratio)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--exchanges", type=int, default=40, help="stored exchanges (about 75 tokens each)")
    parser.add_argument("--quick", action="store_true", help="6 turns")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between chats (a user reading)")
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                        help="the llm's flash_attn parameter (auto: llama-server's choice, on for the CPU)")
    add_model_option(parser)
    add_run_options(parser, "long_conversations")
    args = parser.parse_args()
    if args.quick:
        args.turns = min(args.turns, 6)

    run_and_record(args.name, run, render, args)


if __name__ == "__main__":
    main()

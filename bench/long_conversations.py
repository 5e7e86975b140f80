"""Benchmark 4, long conversations: time to first token on turns 1-20 of a session whose history is
far over its budget (half the context), against a fresh session's first turn, alternating; and in the
same run the same two kinds of turn sent straight to llama-server (started with the flags zenow gives its
child), the baseline: what llama-server itself gives a deep turn against a fresh one.

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

The baseline's long conversation is zenow's: before each turn the benchmark reads the long session's stored
messages and picks its history as zenow does (`zenow.chat._prompt.history_in_steps`, the stored token counts),
so llama-server gets the very prompts zenow sends, with the same system prompt and options; after its reply,
when zenow prefills, the benchmark reads the next turn's start into the baseline's cache the same way
(zenow's own `zenow.servers.prefill`: `/apply-template` cut at a placeholder, `/completion` with
`n_predict: 0`).  The baseline is llama-server at its best on the same conversation, so "long / fresh" on the
baseline is the floor a server in front of it can reach, and "zenow long / llama-server long" what zenow adds
at depth.

    python bench/long_conversations.py [--turns 20] [--quick] [--flash-attn auto|on|off] [--zenow-path DIR]
        [--model GGUF|synthetic] [--pause S] [--via api|v1]

`--via v1`: zenow's legs send the very prompts the baseline gets to `/v1/chat/completions`, as an OpenAI
client keeping the history itself does, and store each turn on the session (so the next prompt holds it);
zenow reads each completion's next turn ahead as it does a session's (`zenow.v1._readahead`).

`--model synthetic`: a random-weight llama about three times slower than SmolLM2 (see chat_overhead); its
byte-level tokenizer makes every text about four times as many tokens.

Target (issue 11): turn N of the long session within 1.5x the first-token time of a short one; the
baseline's own ratio, in the same table, is what llama-server itself allows.
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
    fmt,
    llama_server_like,
    median,
    p90,
    prefilling,
    run_and_record,
    table,
    timed_stream,
    wait_llm_running,
    zenow_serving_llm,
)

from zenow.chat._prompt import Turn, history_in_steps
from zenow.servers import prefill

CONTEXT = 2048
FILLER = ("In the valley the river turned twice before the old mill, where the miller kept a ledger of "
          "every sack of grain, every traveller and every storm that passed over the hills that year.")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as home:
        async with trio.open_nursery() as nursery, zenow_serving_llm(nursery, Path(home), args) as (zenow, http, model):
            await http.post("/api/models/update_param", json={"context_size": CONTEXT, "flash_attn": args.flash_attn})
            await wait_llm_running(http)
            async with llama_server_like(nursery, zenow) as (baseline, argv):  # the child started with CONTEXT
                results = await measure(args, http, baseline.url)
                results["llama_server_flags"] = " ".join(a for a in argv[3:] if not a.startswith("/"))
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


async def measure(args: argparse.Namespace, http: Any, llama_url: str) -> dict[str, Any]:
    long_sid = (await http.post("/api/sessions", json={"first_message": "long"})).json()["session_id"]
    for i in range(args.exchanges):
        await http.post(f"/api/sessions/{long_sid}/messages", json={"role": "user", "content": f"Part {i}: {FILLER}"})
        await http.post(f"/api/sessions/{long_sid}/messages",
                        json={"role": "assistant", "content": f"Noted {i}. {FILLER}"})
    total = (await http.get(f"/api/sessions/{long_sid}")).json()
    stored = total.get("total_tokens")
    params = (await http.get("/api/models/get_param", params={"mode": "llm"})).json()
    system_prompt = params.get("system_prompt") or ""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    system_count = len((await http.post(f"{llama_url}/tokenize", json={"content": system_prompt})).json()["tokens"])
    options = {"temperature": 0.0, "repeat_penalty": params["repeat_penalty"], "max_tokens": args.tokens}

    def question(n: int) -> dict[str, str]:
        return {"role": "user", "content": f"Question {n}: what happened at the mill next?"}

    async def turn(sid: int, n: int, prompt: list[dict[str, str]]) -> float:
        """A chat on zenow: to `/api/chat` on session `sid`; or with `--via v1`, `prompt` sent whole to
        `/v1/chat/completions` and the turn then stored on the session, as a client keeping its own
        history would (so the next `long_prompt` holds it)."""
        await trio.sleep(args.pause)
        if args.via == "api":
            timed = await timed_stream(http, "/api/chat", {
                "session_id": sid, "stream": True, "temperature": 0.0, "max_tokens": args.tokens,
                "messages": [question(n)]})
            return timed.first * 1000
        timed = await timed_stream(http, "/v1/chat/completions", {
            "messages": prompt, "stream": True, "stream_options": {"include_usage": True}, **options}, keep=True)
        for message in (question(n), {"role": "assistant", "content": timed.text}):
            await http.post(f"/api/sessions/{sid}/messages", json=message)
        return timed.first * 1000

    async def direct(messages: list[dict[str, str]], *, read_ahead: bool = False) -> tuple[float, int | None]:
        """`messages` straight to llama-server: ms to the first content and the prompt tokens it computed;
        with `read_ahead`, then the next turn's start read into its cache by zenow's own `prefill`."""
        await trio.sleep(args.pause)
        timed = await timed_stream(http, f"{llama_url}/v1/chat/completions", {
            "messages": messages, "stream": True, "stream_options": {"include_usage": True}, **options}, keep=True)
        if read_ahead:
            await prefill(http, llama_url, {}, [*messages, {"role": "assistant", "content": timed.text}])
        return timed.first * 1000, timed.prompt_computed

    async def long_prompt(n: int) -> list[dict[str, str]]:
        """What zenow sends for the long session's next turn: its history picked as zenow picks it."""
        listing = (await http.get(f"/api/sessions/{long_sid}/messages")).json()
        newest_first = [Turn(m["role"], m["content"], m["token_count"]) for m in reversed(listing["messages"])]
        history = history_in_steps(CONTEXT // 2 - system_count, listing["total_tokens"], newest_first)
        return [*system, *({"role": t.role, "content": t.content} for t in history), question(n)]

    fresh_warm = (await http.post("/api/sessions", json={"first_message": "w"})).json()["session_id"]
    await turn(fresh_warm, 0, [*system, question(0)])
    await direct([*system, question(0)])
    read_ahead = prefilling(args)
    fresh: list[float] = []
    long: list[float] = []
    direct_fresh: list[float] = []
    direct_long: list[float] = []
    direct_computed: list[int] = []
    for n in range(args.turns):
        sid = (await http.post("/api/sessions", json={"first_message": "short"})).json()["session_id"]
        prompt = await long_prompt(n)

        async def zenow_fresh(n: int = n, sid: int = sid) -> None:
            fresh.append(await turn(sid, n, [*system, question(n)]))

        async def zenow_long(n: int = n, prompt: list[dict[str, str]] = prompt) -> None:
            long.append(await turn(long_sid, n, prompt))

        async def direct_fresh_leg(n: int = n) -> None:
            direct_fresh.append((await direct([*system, question(n)]))[0])

        async def direct_long_leg(prompt: list[dict[str, str]] = prompt) -> None:
            first, computed = await direct(prompt, read_ahead=read_ahead)
            direct_long.append(first)
            direct_computed.append(computed)

        # alternating: zenow's legs first on even turns, each side's fresh leg first on even turns
        # (the attribution of zenow's computed tokens in `run` follows this order)
        zenow_legs = (zenow_fresh, zenow_long) if n % 2 == 0 else (zenow_long, zenow_fresh)
        direct_legs = (direct_fresh_leg, direct_long_leg) if n % 2 == 0 else (direct_long_leg, direct_fresh_leg)
        for leg in ((*zenow_legs, *direct_legs) if n % 2 == 0 else (*direct_legs, *zenow_legs)):
            await leg()
    return {"turns": args.turns, "tokens": args.tokens, "context_size": CONTEXT, "stored_tokens": stored,
            "flash_attn": args.flash_attn, "pause": args.pause, "zenow_args": args.zenow_arg, "via": args.via,
            "fresh_first_ms": fresh, "long_first_ms": long,
            "ratio": [lg / fr for lg, fr in zip(long, fresh, strict=True)],
            "direct_fresh_first_ms": direct_fresh, "direct_long_first_ms": direct_long,
            "direct_ratio": [lg / fr for lg, fr in zip(direct_long, direct_fresh, strict=True)],
            "direct_long_computed_prompt_tokens": direct_computed, "direct_read_ahead": read_ahead}


def render(results: dict[str, Any]) -> str:
    fresh, long, ratio = results["fresh_first_ms"], results["long_first_ms"], results["ratio"]
    d_fresh, d_long = results.get("direct_fresh_first_ms") or [], results.get("direct_long_first_ms") or []
    d_ratio = results.get("direct_ratio") or []
    long_computed = results.get("long_computed_prompt_tokens") or []
    fresh_computed = results.get("fresh_computed_prompt_tokens") or []
    d_computed = results.get("direct_long_computed_prompt_tokens") or []

    def cell(values: list[Any], n: int, digits: int = 0, unit: str = "") -> str:
        if n >= len(values):
            return "-"
        return fmt(values[n], digits) + unit if isinstance(values[n], float) else str(values[n])

    rows = [[str(n + 1), cell(fresh, n), cell(long, n), cell(ratio, n, 2, "x"),
             cell(d_fresh, n), cell(d_long, n), cell(d_ratio, n, 2, "x"),
             cell(fresh_computed, n), cell(long_computed, n), cell(d_computed, n)]
            for n in range(len(fresh))]
    for name, pick in (("median", median), ("p90", p90)):
        rows.append([name, fmt(pick(fresh), 0), fmt(pick(long), 0), fmt(pick(ratio), 2) + "x",
                     fmt(pick(d_fresh), 0) if d_fresh else "-", fmt(pick(d_long), 0) if d_long else "-",
                     fmt(pick(d_ratio), 2) + "x" if d_ratio else "-", "", "", ""])
    over = sum(r > 1.5 for r in ratio)
    head = (f"Long conversations: context {results['context_size']} per conversation (history budget "
            f"{results['context_size'] // 2}), a session holding {results['stored_tokens']} tokens, "
            f"{results['turns']} turns of {results['tokens']} tokens, {results.get('model', 'SmolLM2-135M')}, "
            f"flash_attn {results.get('flash_attn', 'auto')}, {results.get('pause', 0):g} s between chats, "
            f"{'zenow through /v1/chat/completions' if results.get('via') == 'v1' else 'zenow through /api/chat'}"
            f"{', zenow ' + ' '.join(results['zenow_args']) if results.get('zenow_args') else ''}; "
            f"the baseline is llama-server sent the same prompts"
            f"{' with the next turn read ahead' if results.get('direct_read_ahead') else ''}\n\n")
    text = head + table(["turn", "zenow fresh first token ms", "zenow long first token ms", "zenow ratio",
                         "llama-server fresh ms", "llama-server long ms", "llama-server ratio",
                         "zenow fresh: prompt tokens computed", "zenow long: computed",
                         "llama-server long: computed"], rows) + f"\n\nzenow turns over 1.5x: {over} of {len(ratio)}"
    if d_long:
        added = [z / d for z, d in zip(long, d_long, strict=False)]
        text += (f"; llama-server's own turns over 1.5x: {sum(r > 1.5 for r in d_ratio)} of {len(d_ratio)}; "
                 f"zenow's long turn over llama-server's: {fmt(median(added), 2)}x p50 "
                 f"({fmt(median(long) - median(d_long), 1)} ms)")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--exchanges", type=int, default=40, help="stored exchanges (about 75 tokens each)")
    parser.add_argument("--quick", action="store_true", help="6 turns")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between chats (a user reading)")
    parser.add_argument("--via", choices=("api", "v1"), default="api",
                        help="zenow's legs through /api/chat (its sessions), or /v1/chat/completions sent the "
                             "baseline's prompts (a client keeping the history)")
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

"""Benchmark 7, footprint: zenow's idle RSS with no model, and the time from `zenow serve` to its
first answer, against a bare hypercorn + quart-trio app started the same way (alternating).

    python bench/footprint.py [--rounds 5] [--quick]

Targets (issue 11): at most 80 MB idle, at most 1.5 s to the first answer.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import trio
from _common import BENCH, REPO, fmt, free_port, median, p90, rss_mib, run_and_record, table, zenow_env


async def first_answer(argv: list[str], env: dict[str, str] | None, port: int) -> tuple[float, float]:
    """Spawn `argv`; seconds until GET /api/health answers 200, and the RSS (MiB) one second later."""
    started = time.perf_counter()
    process = await trio.lowlevel.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, cwd=REPO, env=env)
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=1) as http:
            with trio.fail_after(30):
                while True:
                    try:
                        if (await http.get(f"http://127.0.0.1:{port}/api/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.005)
        ready = time.perf_counter() - started
        await trio.sleep(1.0)
        return ready, rss_mib(process.pid)
    finally:
        process.terminate()
        await process.wait()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    samples: dict[str, list[tuple[float, float]]] = {"zenow": [], "bare app": []}
    for round_ in range(args.rounds):
        for name in (["zenow", "bare app"] if round_ % 2 == 0 else ["bare app", "zenow"]):
            port = free_port()
            if name == "zenow":
                with tempfile.TemporaryDirectory() as home:
                    samples[name].append(await first_answer(
                        [sys.executable, "-m", "zenow", "serve", "--port", str(port), "--home", home],
                        zenow_env(), port))
            else:
                samples[name].append(await first_answer(
                    [sys.executable, str(BENCH / "_bare.py"), "--port", str(port)], None, port))
    return {"rounds": args.rounds, "samples": samples}


def render(results: dict[str, Any]) -> str:
    rows = []
    base = results["samples"]["bare app"]
    for name, samples in results["samples"].items():
        ready = [s[0] * 1000 for s in samples]
        rss = [s[1] for s in samples]
        rows.append([name, fmt(median(ready), 0), fmt(p90(ready), 0), fmt(median(rss), 1), fmt(max(rss), 1),
                     fmt(median(rss) - median([s[1] for s in base]), 1)])
    return (f"Footprint: {results['rounds']} alternating starts, no model\n\n"
            + table(["process", "start to first answer p50 ms", "p90", "idle RSS p50 MiB", "max",
                     "RSS above the bare app"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2

    run_and_record("footprint", run, render, args, timeout=300)


if __name__ == "__main__":
    main()

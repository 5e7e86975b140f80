"""Benchmark 5, downloads: a file from a local HTTP server (python -m http.server on 127.0.0.1)
fetched by zenow (`POST /api/models/download`, until it is `completed`: progress, GGUF check,
fsync and rename included) and by `curl -o`, alternating.

    python bench/downloads.py [--size-mib 1024] [--rounds 3] [--quick] [--follow events|poll] [--no-settle]
        [--zenow-path DIR]

`--follow`: how the zenow leg learns that its download ended: from the event stream
(`GET /api/events?types=download`, opened before the POST; the default) or by polling
`GET /api/models/download/status` every 10 ms.  Each leg's CPU seconds per GiB are
reported: zenow's process (/proc/PID/stat, before and after), curl's (the children's
rusage, before and after), and the HTTP server's for either.  Before each leg (untimed) the
machine's dirty pages are written (`sync`), so that no leg pays for the write-back of the one
before it (curl leaves its GiB dirty; zenow syncs its own); `--no-settle` skips that.

Target (issue 11): at least 90 % of curl's throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio
from _common import client, cpu_seconds, fmt, free_port, median, p90, run_and_record, start_zenow, table, zenow_env


def make_file(path: Path, size: int) -> None:
    """A sparse file of `size` bytes starting with a GGUF magic (zenow checks it)."""
    with path.open("wb") as f:
        f.write(b"GGUF" + (3).to_bytes(4, "little") + bytes(56))
        f.truncate(size)


def children_cpu() -> float:
    """User + system CPU seconds of this process's children that ended and were waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def download_by_zenow(http: httpx.AsyncClient, url: str, filename: str, follow: str) -> None:
    """POST the download, then wait until it is completed (raise `SystemExit` when it fails)."""

    async def start() -> None:
        answer = await http.post("/api/models/download", json={"url": url, "filename": filename, "mode": "llm"})
        if answer.status_code != 200:
            raise SystemExit(f"download refused: {answer.text}")

    def ended(download: dict[str, Any]) -> bool:
        if download["status"] == "failed":
            raise SystemExit(f"download failed: {download}")
        return bool(download["status"] == "completed")

    if follow == "poll":
        await start()
        while True:  # the polling a client without the event stream does
            if ended((await http.get("/api/models/download/status", params={"url": url})).json()["download"]):
                return
            await trio.sleep(0.01)
    async with http.stream("GET", "/api/events", params={"types": "download"}) as events:
        lines = events.aiter_lines()
        async for line in lines:  # subscribed once the snapshot came
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "snapshot":
                break
        await start()
        async for line in lines:
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if event["type"] == "download" and event["url"] == url and ended(event):
                    return
    raise SystemExit("the event stream ended before the download")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    size = args.size_mib * 2**20
    with tempfile.TemporaryDirectory() as root:
        served = Path(root) / "served"
        served.mkdir()
        make_file(served / "model.gguf", size)
        port = free_port()
        server = await trio.lowlevel.open_process(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(served)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await trio.sleep(0.5)
        home = Path(root) / "home"
        samples: dict[str, list[float]] = {"curl -o": [], "zenow": []}
        cpu: dict[str, list[float]] = {"curl -o": [], "zenow": []}  # the client's CPU s per GiB
        server_cpu: dict[str, list[float]] = {"curl -o": [], "zenow": []}  # the HTTP server's
        gib = size / 2**30
        try:
            async with trio.open_nursery() as nursery:
                zenow = await start_zenow(nursery, home, env=zenow_env(), python_path=args.zenow_path)
                try:
                    async with client(zenow.url) as http:
                        for round_ in range(args.rounds):
                            for name in (["curl -o", "zenow"] if round_ % 2 == 0 else ["zenow", "curl -o"]):
                                url = f"http://127.0.0.1:{port}/model.gguf?round={round_}"
                                if args.settle:
                                    await trio.to_thread.run_sync(os.sync)
                                server_before = cpu_seconds(server.pid)
                                if name == "curl -o":
                                    target = Path(root) / "curl.gguf"
                                    before = children_cpu()
                                    started = time.perf_counter()
                                    await trio.run_process(["curl", "-s", "-o", str(target), url])
                                    samples[name].append(size / (time.perf_counter() - started) / 2**20)
                                    cpu[name].append((children_cpu() - before) / gib)
                                    target.unlink()
                                else:
                                    before = cpu_seconds(zenow.pid)
                                    started = time.perf_counter()
                                    await download_by_zenow(http, url, f"bench-{round_}.gguf", args.follow)
                                    samples[name].append(size / (time.perf_counter() - started) / 2**20)
                                    cpu[name].append((cpu_seconds(zenow.pid) - before) / gib)
                                    (home / "models" / "llm" / f"bench-{round_}.gguf").unlink()
                                server_cpu[name].append((cpu_seconds(server.pid) - server_before) / gib)
                finally:
                    await zenow.stop()
        finally:
            server.terminate()
            await server.wait()
    return {"size_mib": args.size_mib, "rounds": args.rounds, "follow": args.follow, "settle": args.settle,
            "mib_per_s": samples,
            "cpu_s_per_gib": cpu, "server_cpu_s_per_gib": server_cpu}


def render(results: dict[str, Any]) -> str:
    curl = results["mib_per_s"]["curl -o"]
    rows = [[name, fmt(median(v), 0), fmt(min(v), 0), fmt(p90(v), 0), fmt(median(v) / median(curl) * 100, 1) + " %",
             fmt(median(results["cpu_s_per_gib"][name]), 3), fmt(median(results["server_cpu_s_per_gib"][name]), 3)]
            for name, v in results["mib_per_s"].items()]
    return (f"Downloads: {results['size_mib']} MiB from python -m http.server on 127.0.0.1, "
            f"{results['rounds']} alternating rounds, zenow followed by {results['follow']}"
            + (", dirty pages synced before each leg" if results.get("settle") else "") + "\n\n"
            + table(["client", "MiB/s p50", "worst", "p90", "of curl", "client CPU s/GiB p50",
                     "server CPU s/GiB p50"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256 MiB, one round")
    parser.add_argument("--follow", choices=["events", "poll"], default="events",
                        help="how the zenow leg learns its download ended: the event stream, or polling its status")
    parser.add_argument("--zenow-path", type=Path, default=None, help="run zenow from this checkout (before/after)")
    parser.add_argument("--no-settle", dest="settle", action="store_false",
                        help="do not write the dirty pages back before each leg")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.rounds = min(args.size_mib, 256), 1

    run_and_record("downloads", run, render, args, timeout=600)


if __name__ == "__main__":
    main()

"""Benchmark 5, downloads: a file from a local HTTP server (python -m http.server on 127.0.0.1)
fetched by zenow (`POST /api/models/download`, until its status is `completed`: progress, GGUF
check and rename included) and by `curl -o`, alternating.

    python bench/downloads.py [--size-mib 1024] [--rounds 3] [--quick]

Target (issue 11): at least 90 % of curl's throughput.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from _common import client, fmt, free_port, median, p90, run_and_record, start_zenow, table, zenow_env


def make_file(path: Path, size: int) -> None:
    """A sparse file of `size` bytes starting with a GGUF magic (zenow checks it)."""
    with path.open("wb") as f:
        f.write(b"GGUF" + (3).to_bytes(4, "little") + bytes(56))
        f.truncate(size)


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
        try:
            async with trio.open_nursery() as nursery:
                zenow = await start_zenow(nursery, home, env=zenow_env())
                try:
                    async with client(zenow.url) as http:
                        for round_ in range(args.rounds):
                            for name in (["curl -o", "zenow"] if round_ % 2 == 0 else ["zenow", "curl -o"]):
                                url = f"http://127.0.0.1:{port}/model.gguf?round={round_}"
                                started = time.perf_counter()
                                if name == "curl -o":
                                    target = Path(root) / "curl.gguf"
                                    await trio.run_process(["curl", "-s", "-o", str(target), url])
                                    samples[name].append(size / (time.perf_counter() - started) / 2**20)
                                    target.unlink()
                                else:
                                    answer = await http.post("/api/models/download", json={
                                        "url": url, "filename": f"bench-{round_}.gguf", "mode": "llm"})
                                    if answer.status_code != 200:
                                        raise SystemExit(f"download refused: {answer.text}")
                                    while True:
                                        status = (await http.get("/api/models/download/status",
                                                                 params={"url": url})).json()["download"]
                                        if status["status"] == "completed":
                                            break
                                        if status["status"] == "failed":
                                            raise SystemExit(f"download failed: {status}")
                                        await trio.sleep(0.01)
                                    samples[name].append(size / (time.perf_counter() - started) / 2**20)
                                    (home / "models" / "llm" / f"bench-{round_}.gguf").unlink()
                finally:
                    await zenow.stop()
        finally:
            server.terminate()
            await server.wait()
    return {"size_mib": args.size_mib, "rounds": args.rounds, "mib_per_s": samples}


def render(results: dict[str, Any]) -> str:
    curl = results["mib_per_s"]["curl -o"]
    rows = [[name, fmt(median(v), 0), fmt(min(v), 0), fmt(p90(v), 0), fmt(median(v) / median(curl) * 100, 1) + " %"]
            for name, v in results["mib_per_s"].items()]
    return (f"Downloads: {results['size_mib']} MiB from python -m http.server on 127.0.0.1, "
            f"{results['rounds']} alternating rounds\n\n"
            + table(["client", "MiB/s p50", "worst", "p90", "of curl"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256 MiB, one round")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.rounds = min(args.size_mib, 256), 1

    run_and_record("downloads", run, render, args, timeout=600)


if __name__ == "__main__":
    main()

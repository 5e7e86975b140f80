"""What 1,000 idle `/api/events` subscribers cost a zenow: its RSS before and after, and the fan-out time.

Starts its own `zenow serve` (port 0, a temporary home, `--max-connections` above the
subscriber count) unless `--url` and `--pid` name a running one; opens N SSE
connections from this process (plain sockets, in batches), waits until each one has
received its snapshot (so each is subscribed), reads zenow's RSS from /proc, creates
one session and times how long until every subscriber received `session.created`,
then closes them all and reads the RSS once more.  Everything runs under a deadline
(`--timeout`, default 120 s).

    .venv/bin/python bench/events_rss.py [--subscribers 1000] [--url URL --pid PID]

Not a test: it prints numbers for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
_SERVING = re.compile(r"zenow serving on (http://[\d.]+:\d+)")
BATCH = 50


def rss_kib(pid: int) -> int:
    """Resident set size of `pid` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Subscriber:
    """One SSE connection read by hand: enough HTTP/1.1 to find `data:` frames in a chunked body."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def connect(cls, host: str, port: int) -> Subscriber:
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(f"GET /api/events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
                              .encode())
        return cls(stream)

    async def event(self) -> dict:
        """The next event (chunk framing is skipped: each event is one chunk holding `data: ...\\n\\n`)."""
        while True:
            start = self.buffer.find(b"data: ")
            end = self.buffer.find(b"\n\n", start)
            if start >= 0 and end >= 0:
                frame, self.buffer = self.buffer[start + 6:end], self.buffer[end + 2:]
                return json.loads(frame)
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("zenow closed the event stream")
            self.buffer += data


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        raise SystemExit(f"need {needed} file descriptors, the limit is {soft} (ulimit -n)")


async def start_zenow(nursery: trio.Nursery, home: Path, subscribers: int) -> tuple[str, trio.Process]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "zenow", "serve", "--port", "0", "--home", str(home),
         "--max-connections", str(subscribers + 100)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("ZENOW_")},
    )
    found = trio.Event()
    url = ""

    async def read_stderr() -> None:
        nonlocal url
        assert process.stderr is not None
        pending = b""
        async for chunk in process.stderr:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                match = _SERVING.search(line.decode(errors="replace"))
                if match and not found.is_set():
                    url = match.group(1)
                    found.set()
        found.set()

    nursery.start_soon(read_stderr)
    await found.wait()
    if not url:
        raise SystemExit("zenow exited before serving")
    return url, process


async def measure(url: str, pid: int, count: int) -> dict[str, float]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    results: dict[str, float] = {}
    await trio.sleep(0.5)  # let zenow settle after its start
    results["rss_before_kib"] = rss_kib(pid)

    subscribers: list[Subscriber] = []
    started = time.perf_counter()

    async def one() -> None:
        subscriber = await Subscriber.connect(host, int(port))
        snapshot = await subscriber.event()
        assert snapshot["type"] == "snapshot", snapshot
        subscribers.append(subscriber)

    for first in range(0, count, BATCH):
        async with trio.open_nursery() as nursery:
            for _ in range(min(BATCH, count - first)):
                nursery.start_soon(one)
    results["subscribe_seconds"] = time.perf_counter() - started
    await trio.sleep(1.0)  # idle: whatever zenow allocates lazily is allocated
    results["rss_subscribed_kib"] = rss_kib(pid)

    published = time.perf_counter()
    body = b'{"first_message": "fan out"}'
    async with await trio.open_tcp_stream(host, int(port)) as writer:
        await writer.send_all(b"POST /api/sessions HTTP/1.1\r\nHost: " + host.encode()
                              + b"\r\nContent-Type: application/json\r\nContent-Length: "
                              + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        async with trio.open_nursery() as nursery:
            for subscriber in subscribers:
                async def receive(s: Subscriber = subscriber) -> None:
                    event = await s.event()
                    assert event["type"] == "session.created", event

                nursery.start_soon(receive)
    results["fan_out_seconds"] = time.perf_counter() - published
    results["rss_after_event_kib"] = rss_kib(pid)

    for subscriber in subscribers:
        await subscriber.stream.aclose()
    await trio.sleep(1.0)
    results["rss_closed_kib"] = rss_kib(pid)
    results["subscribers"] = len(subscribers)
    return results


async def main(args: argparse.Namespace) -> None:
    raise_fd_limit(2 * args.subscribers + 200)  # both ends, when zenow is our child
    with trio.fail_after(args.timeout):
        if args.url:
            results = await measure(args.url, args.pid, args.subscribers)
        else:
            with tempfile.TemporaryDirectory() as home:
                async with trio.open_nursery() as nursery:
                    url, process = await start_zenow(nursery, Path(home), args.subscribers)
                    try:
                        results = await measure(url, process.pid, args.subscribers)
                    finally:
                        process.terminate()
                        await process.wait()
    before, subscribed = results["rss_before_kib"], results["rss_subscribed_kib"]
    per = (subscribed - before) / max(1, results["subscribers"])
    print(f"subscribers:                 {int(results['subscribers'])}")
    print(f"subscribing took:            {results['subscribe_seconds']:.2f} s")
    print(f"zenow RSS before:            {before / 1024:.1f} MiB")
    print(f"zenow RSS with subscribers:  {subscribed / 1024:.1f} MiB (+{(subscribed - before) / 1024:.1f} MiB, "
          f"{per:.1f} KiB each)")
    print(f"one event to all of them:    {results['fan_out_seconds'] * 1000:.0f} ms")
    print(f"zenow RSS after the event:   {results['rss_after_event_kib'] / 1024:.1f} MiB")
    print(f"zenow RSS after closing all: {results['rss_closed_kib'] / 1024:.1f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--url", default=None, help="a running zenow (default: start one)")
    parser.add_argument("--pid", type=int, default=None, help="its process id (with --url)")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    arguments = parser.parse_args()
    if arguments.url and arguments.pid is None:
        parser.error("--url needs --pid (to read its RSS)")
    trio.run(main, arguments)

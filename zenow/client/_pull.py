"""`zenow pull URL`: download a model through zenow, with progress fed by the live events.

The client subscribes to `download` events first (so it misses none), then asks zenow
to download, then shows each event for its URL.  When the stream is quiet for a
moment, or ended (a dropped subscriber), it asks for the download's status instead,
so a pull always finishes.  Ctrl-C cancels the download in zenow; its `.part` stays,
and the same `zenow pull` again resumes it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ._api import ClientError, ZenowAPI
from ._output import Output, human_size, human_time

__all__ = ["pull"]

#: Seconds without an event for this download before the client asks for its status.
QUIET_POLL = 1.0
#: Seconds between two progress lines when stdout is not a terminal.
PLAIN_INTERVAL = 1.0
#: Events the reading thread may hold for the main thread.
FEED_CAPACITY = 1024


class _EventFeed:
    """Reads an event stream in a thread, so the main thread can wait for an event with a timeout."""

    def __init__(self, events: Iterator[dict[str, Any]]) -> None:
        self._events = events
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(FEED_CAPACITY)
        self.ended = False
        threading.Thread(target=self._read, name="zenow events", daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self._events:
                self._queue.put(event)
        except Exception:  # noqa: BLE001 - the stream broke or was closed: the main thread polls instead
            pass
        self._queue.put(None)

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next event, or None when none came within `timeout` or the stream ended."""
        if self.ended:
            time.sleep(timeout)
            return None
        try:
            event = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if event is None:
            self.ended = True
        return event


class _ProgressView:
    """Progress of one download: a rich bar on a terminal, a line a second otherwise, nothing with --json."""

    def __init__(self, out: Output, label: str) -> None:
        self._out = out
        self._label = label
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._last_line = 0.0

    def __enter__(self) -> _ProgressView:
        if self._out.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                DownloadColumn(binary_units=True), TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self._out.console,
            )
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=None)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, record: dict[str, Any]) -> None:
        downloaded, total = record.get("downloaded") or 0, record.get("total")
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=downloaded, total=total)
            return
        if self._out.as_json:
            return
        now = time.monotonic()
        final = record.get("status") != "downloading"
        if final or now - self._last_line >= PLAIN_INTERVAL:
            self._last_line = now
            percent = f"{record.get('progress', 0.0):5.1f}%" if total else "    ?%"
            speed = record.get("speed")
            self._out.line(f"{self._label}: {percent} {human_size(downloaded)} / {human_size(total)}"
                           f"  {human_size(speed) + '/s' if speed else '-'}  ETA {human_time(record.get('eta'))}")


def _filename(name: str | None) -> str | None:
    if name is None:
        return None
    return name if name.lower().endswith(".gguf") else f"{name}.gguf"


def pull(api: ZenowAPI, out: Output, url: str, mode: str, name: str | None, sha256: str | None) -> int:
    """Download `url` into `mode` through zenow and show its progress until it ends.

    Returns 0 when the model is downloaded and registered, 130 when interrupted (the
    download is cancelled and stays resumable).  Raises `ClientError` when zenow refuses
    it or it fails.
    """
    body: dict[str, Any] = {"url": url, "mode": mode}
    if (filename := _filename(name)) is not None:
        body["filename"] = filename
    if sha256:
        body["sha256"] = sha256
    try:
        with api.events("download") as events:
            if next(events, None) is None:  # the snapshot: subscribed from here on
                raise ClientError(f"zenow at {api.url} ended its event stream at once")
            feed = _EventFeed(events)
            answer = api.post("/api/models/download", body)
            try:
                record = _follow(api, out, feed, url, answer["url"])
            except KeyboardInterrupt:
                api.delete("/api/models/download", {"url": url})
                out.note("pull cancelled: the partial download is kept; the same `zenow pull` resumes it")
                return 130
    except KeyboardInterrupt:
        return 130
    model = record["filename"].removesuffix(".gguf")
    if record["status"] != "completed":
        raise ClientError(f"download of {answer['url']} failed: {record.get('error') or 'unknown error'}")
    if out.as_json:
        out.json({"result": "completed", "model": model, "mode": mode, "download": record})
    else:
        out.line(f"pulled {model} ({human_size(record.get('total'))}) for {mode}: it is registered")
    return 0


def _follow(api: ZenowAPI, out: Output, feed: _EventFeed, url: str, shown_url: str) -> dict[str, Any]:
    """Show the download's progress until it ends; return its last record."""
    record: dict[str, Any] = api.get("/api/models/download/status", {"url": url})["download"]
    label = record["filename"].removesuffix(".gguf")
    with _ProgressView(out, label) as view:
        view.update(record)
        heard = time.monotonic()
        while record["status"] == "downloading":
            event = feed.next(max(0.05, QUIET_POLL - (time.monotonic() - heard)))
            if event is not None and event.get("type") == "download" and event.get("url") == shown_url:
                record = event
                if out.as_json:
                    out.json(event)
            elif time.monotonic() - heard >= QUIET_POLL:
                record = api.get("/api/models/download/status", {"url": url})["download"]
            else:
                continue
            heard = time.monotonic()
            view.update(record)
    return record

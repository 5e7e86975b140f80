"""The download actor: owns every download, each one a task in its nursery; `Downloads` is its handle.

A download of a URL goes through these states (the spec's `status`)::

    downloading ──> completed     the file is complete, checked, renamed into place, registered
        │
        └────────> failed         `error` says why; the `.part` stays when the download can resume

While `downloading`, the transfer retries a dropped connection with exponential backoff
and continues from the bytes on disk with an HTTP `Range` request.  Progress lives in
memory (updated with every chunk received); the store gets the record when the
download starts, when each connection's answer is accepted (the size is then known),
every `checkpoint_interval` seconds, and when it ends: never a write per chunk.

Restart policy: a record still `downloading` when zenow stops (or crashes) is shown as
`failed` with error `interrupted: zenow stopped` on the next start, its `downloaded`
being the size of the `.part` on disk; downloading the same URL again resumes from it.
Nothing restarts on its own: a download costs the user's bandwidth, so only a request
starts one.
"""

from __future__ import annotations

import errno
import logging
import ssl
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import trio

from .. import __version__
from ..actor import Actor, ActorRef
from ..errors import DownloadFailed, DownloadNotFound, InvalidModelFile, InvalidRequest, ZenowError
from ..settings import Settings
from ..store import DownloadRecord, Store
from . import _files as files
from ._headers import content_length, parse_content_range
from ._target import DownloadTarget

__all__ = ["CANCELLED", "INTERRUPTED", "DownloadActor", "DownloadPolicy", "Downloads"]

log = logging.getLogger(__name__)

#: `error` of a download the user cancelled.
CANCELLED = "cancelled"
#: `error` of a download that was running when zenow stopped.
INTERRUPTED = "interrupted: zenow stopped"

#: Seconds a final record may take to reach the store when the transfer ends.
_STORE_WRITE_TIMEOUT = 5.0


@dataclass(frozen=True)
class DownloadPolicy:
    """Timing of downloads: retries, flushing, checkpoints and HTTP timeouts (seconds, bytes)."""

    #: Wait before the first retry of a dropped connection; doubles up to `backoff_max`.
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: Consecutive attempts that receive nothing before the download fails (progress resets it).
    attempts_without_progress: int = 8
    #: Received bytes are written to the `.part` once this many are buffered, or this often.
    flush_bytes: int = 1 << 20
    flush_interval: float = 0.5
    #: How often a running download's progress is saved to the store.
    checkpoint_interval: float = 5.0
    connect_timeout: float = 20.0
    #: A connection that delivers nothing for this long counts as dropped.
    read_timeout: float = 60.0


class _Failure(Exception):
    """Ends a transfer in `failed`; `discard_part` when the bytes on disk cannot be resumed."""

    def __init__(self, reason: str, *, discard_part: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.discard_part = discard_part


class _Dropped(Exception):
    """One attempt ended early but the download may go on: retry after a backoff.

    `progressed`: the attempt received bytes (so the backoff starts again from the
    beginning).  `start_over`: the bytes on disk are no good for a resume.
    """

    def __init__(self, reason: str, *, progressed: bool = False, start_over: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.progressed = progressed
        self.start_over = start_over


class _Outcome:
    """The final record of one transfer, published once to every caller waiting outside the actor."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._record: DownloadRecord | None = None

    def publish(self, record: DownloadRecord) -> None:
        self._record = record
        self._done.set()

    async def wait(self) -> DownloadRecord:
        await self._done.wait()
        assert self._record is not None
        return self._record


@dataclass(frozen=True, slots=True)
class _Begun:
    """The answer to `begin`: the record now, and the outcome to wait for while it runs."""

    record: DownloadRecord
    outcome: _Outcome | None
    #: A cancelled transfer of the URL is still putting its files away: wait for it, then ask again.
    settling: _Outcome | None = None


@dataclass(eq=False)
class _Download:
    """One URL's download as the actor tracks it; only the actor and its tasks touch it."""

    target: DownloadTarget
    status: str
    downloaded: int
    total: int | None
    error: str | None
    #: Set while a transfer task runs (until its final record is published).
    outcome: _Outcome | None = None
    scope: trio.CancelScope | None = None
    cancel_requested: bool = False

    @classmethod
    def of(cls, record: DownloadRecord) -> _Download:
        target = DownloadTarget(record.url, record.filename, record.mode, record.sha256)
        return cls(target, record.status, record.downloaded, record.total, record.error)

    @property
    def running(self) -> bool:
        return self.outcome is not None

    def record(self) -> DownloadRecord:
        t = self.target
        return DownloadRecord(
            url=t.url, filename=t.filename, mode=t.mode, status=self.status,  # type: ignore[arg-type]
            downloaded=self.downloaded, total=self.total, error=self.error, sha256=t.sha256,
        )


class DownloadActor(Actor):
    """Owns every download: its state, its task, its `.part` file and one HTTP client."""

    def __init__(self, settings: Settings, store: Store, policy: DownloadPolicy | None = None) -> None:
        self._settings = settings
        self._store = store
        self._policy = policy or DownloadPolicy()
        self._downloads: dict[str, _Download] = {}
        self._client: httpx.AsyncClient | None = None

    # ------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        p = self._policy
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=p.connect_timeout, read=p.read_timeout, write=p.read_timeout,
                                  pool=p.connect_timeout),
            follow_redirects=True,
            trust_env=False,
            # byte offsets must be the file's, so no compression on the wire
            headers={"Accept-Encoding": "identity", "User-Agent": f"zenow/{__version__}"},
        )
        for record in await self._store.list_downloads():
            download = _Download.of(record)
            if record.status == "downloading":
                download.status, download.error = "failed", INTERRUPTED
                download.downloaded = await trio.to_thread.run_sync(files.file_size, self._part_path(download.target))
                await self._store.save_download(download.record())
            self._downloads[record.url] = download

    async def teardown(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    # ------------------------------------------------------------ operations

    async def begin(self, target: DownloadTarget) -> _Begun:
        """Start a download of `target`, join the one running for its URL, or answer `completed`."""
        current = self._downloads.get(target.url)
        if current is not None and current.running:
            assert current.outcome is not None
            if current.cancel_requested:
                return _Begun(current.record(), None, settling=current.outcome)
            _check_joinable(current.target, target)
            if target.sha256 and not current.target.sha256:
                current.target = replace(current.target, sha256=target.sha256)
            return _Begun(current.record(), current.outcome)
        for other in self._downloads.values():
            if other.running and (other.target.mode, other.target.filename) == (target.mode, target.filename):
                raise InvalidRequest(
                    f"filename: {target.mode}/{target.filename} is already being downloaded from {other.target.url}"
                )

        final = self._final_path(target)
        try:
            existing = await trio.to_thread.run_sync(files.existing_file, final)
        except OSError as exc:
            raise DownloadFailed(f"Cannot check {final}: {exc.strerror or exc}") from exc
        if existing is not None:
            size, is_gguf = existing
            if not is_gguf:
                raise InvalidModelFile(f"filename: {final} already exists and is not a GGUF file")
            await self._store.register_model(target.mode, target.model_name, str(final), target.url, size)
            download = _Download(target, "completed", size, size, None)
            await self._store.save_download(download.record())
            self._downloads[target.url] = download
            return _Begun(download.record(), None)

        await self._claim_part(target)
        on_disk = await trio.to_thread.run_sync(files.file_size, self._part_path(target))
        same_file = current is not None and (current.target.mode, current.target.filename) == (
            target.mode, target.filename)
        known_total = current.total if same_file and current is not None else None
        download = _Download(target, "downloading", on_disk, known_total, None)
        await self._store.save_download(download.record())
        download.outcome = _Outcome()
        download.scope = trio.CancelScope()
        self._downloads[target.url] = download
        self.nursery.start_soon(self._transfer, download, name=f"download {target.url}")
        return _Begun(download.record(), download.outcome)

    async def status(self, url: str) -> DownloadRecord:
        return self._find(url).record()

    async def all(self) -> list[DownloadRecord]:
        return [download.record() for download in self._downloads.values()]

    async def cancel(self, url: str) -> tuple[DownloadRecord, _Outcome | None]:
        """Cancel the running transfer of `url`; the outcome publishes the record once it stopped."""
        download = self._find(url)
        if not download.running:
            return download.record(), None
        download.cancel_requested = True
        assert download.scope is not None
        download.scope.cancel()
        return download.record(), download.outcome

    async def _claim_part(self, target: DownloadTarget) -> None:
        """Discard a `.part` of the same file left by a download of another URL: its bytes are not ours."""
        for other in self._downloads.values():
            if (other.target.url != target.url and other.status == "failed" and other.downloaded
                    and (other.target.mode, other.target.filename) == (target.mode, target.filename)):
                log.info("%s replaces the partial download of %s", target.url, other.target.url)
                try:
                    await trio.to_thread.run_sync(files.remove_file, self._part_path(target))
                except OSError as exc:
                    raise DownloadFailed(f"Cannot remove {self._part_path(target)}: {exc.strerror}") from exc
                other.downloaded = 0
                await self._store.save_download(other.record())

    def _find(self, url: str) -> _Download:
        download = self._downloads.get(url)
        if download is None:
            raise DownloadNotFound(f"No download for url {url!r}")
        return download

    def _final_path(self, target: DownloadTarget) -> Path:
        return self._settings.mode_dir(target.mode) / target.filename

    def _part_path(self, target: DownloadTarget) -> Path:
        return files.part_path_of(self._final_path(target))

    # ------------------------------------------------------------ the transfer task

    async def _transfer(self, download: _Download) -> None:
        """Run one download to its end and publish the final record; never raises but Cancelled."""
        outcome, scope = download.outcome, download.scope
        assert outcome is not None and scope is not None
        error: str | None = INTERRUPTED  # unless it ends any other way, zenow is stopping
        try:
            with scope:
                await self._download(download)
                error = None
            if scope.cancelled_caught:
                error = CANCELLED
        except _Failure as failure:
            error = failure.reason
            if failure.discard_part:
                try:
                    await trio.to_thread.run_sync(files.remove_file, self._part_path(download.target))
                    download.downloaded = 0  # nothing of it is kept
                except OSError as exc:
                    log.warning("download of %s: cannot remove its .part: %s", download.target.url, exc)
        except OSError as exc:
            error = f"file error: {exc}"
        except Exception as exc:  # a bug must fail this download, not every other one
            log.exception("download of %s failed unexpectedly", download.target.url)
            error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            download.status = "completed" if error is None else "failed"
            download.error = error
            download.outcome = download.scope = None
            record = download.record()
            expected = error in (None, CANCELLED, INTERRUPTED)
            with trio.CancelScope(shield=True), trio.move_on_after(_STORE_WRITE_TIMEOUT):
                try:
                    await self._store.save_download(record)
                except ZenowError as exc:
                    # at shutdown the store may stop first; the next start marks the record itself
                    log.log(logging.INFO if error == INTERRUPTED else logging.WARNING,
                            "could not save the state of the download of %s: %s", record.url, exc)
            outcome.publish(record)
            if error is None:
                log.info("downloaded %s to %s", record.url, self._final_path(download.target))
            else:
                log.log(logging.INFO if expected else logging.WARNING,
                        "download of %s ended: %s", record.url, error)

    async def _download(self, download: _Download) -> None:
        """Fetch until the `.part` is complete, check it, rename it into place and register the model.

        Raises `_Failure` when the download cannot succeed.
        """
        target, policy = download.target, self._policy
        part = self._part_path(target)
        backoff = policy.backoff_initial
        barren = 0  # consecutive attempts that received nothing
        while True:
            try:
                await self._attempt(download, part)
                break
            except _Dropped as dropped:
                if dropped.progressed:
                    barren, backoff = 0, policy.backoff_initial
                barren += 1
                if dropped.start_over:
                    await trio.to_thread.run_sync(files.remove_file, part)
                if barren >= policy.attempts_without_progress:
                    raise _Failure(f"{dropped.reason} (gave up after {barren} attempts)") from None
                log.info("download of %s: %s; retrying in %.1f s", target.url, dropped.reason, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, policy.backoff_max)

        size = await self._verify(download, part)
        final = self._final_path(target)
        with trio.CancelScope(shield=True):  # once renamed, the model is registered whatever happens
            await trio.to_thread.run_sync(files.promote, part, final)
            download.downloaded = download.total = size
            try:
                await self._store.register_model(target.mode, target.model_name, str(final), target.url, size)
            except ZenowError as exc:
                raise _Failure(f"downloaded, but registering the model failed: {exc}") from exc

    async def _verify(self, download: _Download, part: Path) -> int:
        """The size of the complete `.part` once its size, magic and digest check; else `_Failure`."""
        target = download.target
        size = await trio.to_thread.run_sync(files.file_size, part)
        if download.total is not None and size != download.total:
            raise _Failure(f"size mismatch: got {size} bytes, expected {download.total}", discard_part=True)
        if not await trio.to_thread.run_sync(files.has_gguf_magic, part):
            raise _Failure("not a GGUF file (it does not start with the GGUF magic)", discard_part=True)
        if target.sha256 is not None:
            digest = await trio.to_thread.run_sync(files.sha256_of, part)
            if digest != target.sha256:
                raise _Failure(f"sha256 mismatch: expected {target.sha256}, got {digest}", discard_part=True)
        return size

    async def _attempt(self, download: _Download, part: Path) -> None:
        """One HTTP request: continue the `.part` from its size to the end of the body.

        Raises `_Dropped` when the attempt ended early (retry), `_Failure` when the
        download cannot succeed.
        """
        assert self._client is not None
        offset = await trio.to_thread.run_sync(files.file_size, part)
        if offset and not await trio.to_thread.run_sync(files.has_gguf_magic, part):
            offset = 0  # a .part that is no GGUF prefix is not worth resuming
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            async with self._client.stream("GET", download.target.url, headers=headers) as response:
                offset, total = _accepted_range(response, offset, download.total)
                download.downloaded, download.total = offset, total
                if total is not None and offset == total:
                    return  # a 416 for a .part that was already complete
                if total is not None:
                    await self._check_free_space(part.parent, total - offset)
                await self._checkpoint(download)  # the size is known now: worth keeping
                await self._receive(download, response, part, offset)
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc

    async def _check_free_space(self, directory: Path, needed: int) -> None:
        await trio.to_thread.run_sync(lambda: directory.mkdir(parents=True, exist_ok=True))
        free = await trio.to_thread.run_sync(files.free_bytes, directory)
        if free < needed:
            raise _Failure(f"not enough disk space: {needed} bytes needed, {free} free in {directory}")

    async def _receive(self, download: _Download, response: httpx.Response, part: Path, offset: int) -> None:
        """Write the body to the `.part` from `offset`; flush and fsync it when the body is complete."""
        policy, total = self._policy, download.total
        try:
            writer = await trio.to_thread.run_sync(files.PartFile, part, offset)
        except OSError as exc:
            raise _write_failure(part, exc) from exc
        buffer = bytearray()
        received = 0
        magic_checked = offset > 0  # a resumed .part was checked before the request
        last_flush = last_checkpoint = trio.current_time()

        async def flush() -> None:
            if buffer:
                data = bytes(buffer)
                buffer.clear()
                try:
                    await trio.to_thread.run_sync(writer.write, data)
                except OSError as exc:
                    raise _write_failure(part, exc) from exc

        try:
            try:
                async for chunk in response.aiter_raw():
                    buffer += chunk
                    received += len(chunk)
                    download.downloaded += len(chunk)
                    if not magic_checked and len(buffer) >= len(files.GGUF_MAGIC):
                        if not buffer.startswith(files.GGUF_MAGIC):
                            raise _Failure(
                                f"not a GGUF file (it starts with {bytes(buffer[:16])!r})", discard_part=True
                            )
                        magic_checked = True
                    if total is not None and download.downloaded > total:
                        raise _Failure(f"the server sent more than the {total} bytes it announced",
                                       discard_part=True)
                    now = trio.current_time()
                    if magic_checked and (len(buffer) >= policy.flush_bytes or now - last_flush >= policy.flush_interval):
                        await flush()
                        last_flush = now
                    if now - last_checkpoint >= policy.checkpoint_interval:
                        await self._checkpoint(download)
                        last_checkpoint = now
            except httpx.HTTPError as exc:
                translated = _translate(exc)
                if isinstance(translated, _Dropped):
                    translated.progressed = received > 0
                raise translated from exc
            if total is not None and download.downloaded < total:
                raise _Dropped(f"the connection closed after {download.downloaded} of {total} bytes",
                               progressed=received > 0)
            await flush()
            try:
                await trio.to_thread.run_sync(writer.sync)
            except OSError as exc:
                raise _write_failure(part, exc) from exc
        finally:
            # whatever arrived is kept for a resume, even when the transfer is being cancelled
            with trio.CancelScope(shield=True):
                try:
                    await flush()
                except _Failure as failure:
                    log.warning("download of %s: %s", download.target.url, failure.reason)
                try:
                    await trio.to_thread.run_sync(writer.close)
                except OSError as exc:
                    log.warning("download of %s: closing %s: %s", download.target.url, part, exc)

    async def _checkpoint(self, download: _Download) -> None:
        try:
            await self._store.save_download(download.record())
        except ZenowError as exc:
            log.warning("could not checkpoint the download of %s: %s", download.target.url, exc)


def _check_joinable(running: DownloadTarget, asked: DownloadTarget) -> None:
    """Raise `InvalidRequest` when a request for a running URL asks for a different file."""
    if asked.mode != running.mode:
        raise InvalidRequest(f"mode: {running.url} is already downloading for mode {running.mode!r}")
    if asked.filename != running.filename:
        raise InvalidRequest(f"filename: {running.url} is already downloading as {running.filename!r}")
    if asked.sha256 and running.sha256 and asked.sha256 != running.sha256:
        raise InvalidRequest(f"sha256: {running.url} is already downloading with a different sha256")


def _accepted_range(response: httpx.Response, offset: int, known_total: int | None) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's size (None when unknown), from the status.

    Raises `_Dropped` for a retry (with `start_over` when the `.part` must go) and
    `_Failure` for an answer that ends the download.
    """
    status = response.status_code
    if status == 206:
        cr = parse_content_range(response.headers.get("content-range"))
        if cr is None or cr.first != offset:
            raise _Dropped(f"the server answered a range other than bytes={offset}-", start_over=True)
        if known_total is not None and cr.complete is not None and cr.complete != known_total:
            raise _Dropped(f"the file changed on the server ({known_total} -> {cr.complete} bytes)",
                           start_over=True)
        return offset, cr.complete
    if status == 200:
        if offset:
            log.info("%s ignored the range request; starting over", response.url)
        return 0, content_length(response.headers)
    if status == 416 and offset:
        cr = parse_content_range(response.headers.get("content-range"))
        if cr is not None and cr.complete == offset:
            return offset, offset
        raise _Dropped("the server refused to resume", start_over=True)
    reason = f"HTTP {status} {response.reason_phrase}".rstrip()
    if status in (408, 425, 429) or status >= 500:
        raise _Dropped(reason)
    raise _Failure(f"{reason} from {response.url}", discard_part=True)


def _translate(exc: httpx.HTTPError) -> _Dropped | _Failure:
    """An httpx error as a retry (a dropped or stalled connection) or a failure (TLS, redirects...)."""
    tls = _tls_cause(exc)
    if tls is not None:
        return _Failure(f"TLS error: {tls}")
    if isinstance(exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)):
        return _Dropped(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    return _Failure(f"{type(exc).__name__}: {exc}")


def _tls_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, ssl.SSLError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _write_failure(part: Path, exc: OSError) -> _Failure:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return _Failure(f"disk full while writing {part}: {exc.strerror}")
    return _Failure(f"cannot write {part}: {exc.strerror or exc}")


class Downloads:
    """Typed access to the download actor.

    Every method raises `ActorUnavailable` when the download actor is down.
    """

    def __init__(self, ref: ActorRef[DownloadActor]) -> None:
        self._ref = ref

    async def start(self, url: str, filename: str | None, mode: str, sha256: str | None = None) -> DownloadRecord:
        """Start downloading `url` to `models/<mode>/<filename>`, or join its running download.

        Returns at once with the current record: `downloading`, or `completed` when the
        file is already there (nothing is fetched; the model is registered).  `filename`
        None takes the URL path's last segment.  Raises `InvalidRequest` naming the bad
        field (`url`, `filename`, `sha256`; also a running download of the URL to another
        file), `InvalidMode`, or `InvalidModelFile` when a non-GGUF file holds the name;
        nothing is written then.
        """
        return (await self._begin(DownloadTarget.check(url, filename, mode, sha256))).record

    async def fetch(self, url: str, filename: str | None, mode: str, sha256: str | None = None) -> DownloadRecord:
        """Like `start`, then wait for the download to end; return its `completed` record.

        Raises what `start` raises, and `DownloadFailed` with the reason when it ends in
        `failed`.  Cancelling the caller stops the waiting, not the download.
        """
        begun = await self._begin(DownloadTarget.check(url, filename, mode, sha256))
        record = begun.record if begun.outcome is None else await begun.outcome.wait()
        if record.status != "completed":
            raise DownloadFailed(f"Download of {url} failed: {record.error}")
        return record

    async def status(self, url: str) -> DownloadRecord:
        """The record of `url` (of this run, or kept from an earlier one); raises `DownloadNotFound`."""
        return await self._ref.call(DownloadActor.status, url)

    async def all(self) -> list[DownloadRecord]:
        """Every download zenow knows of, oldest first."""
        return await self._ref.call(DownloadActor.all)

    async def cancel(self, url: str) -> DownloadRecord:
        """Stop the running download of `url` and return its record once stopped.

        The `.part` stays for a later resume; the record is `failed` with error
        `cancelled`.  A download that is not running is returned unchanged.  Raises
        `DownloadNotFound`.
        """
        record, outcome = await self._ref.call(DownloadActor.cancel, url)
        return record if outcome is None else await outcome.wait()

    async def _begin(self, target: DownloadTarget) -> _Begun:
        while True:
            begun = await self._ref.call(DownloadActor.begin, target)
            if begun.settling is None:
                return begun
            await begun.settling.wait()

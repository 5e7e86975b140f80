"""The download actor: owns every download, each one a task in its nursery; `Downloads` is its handle.

A download of a URL goes through these states (the spec's `status`)::

    downloading ──> completed     the file is complete, checked, renamed into place, registered
        │
        └────────> failed         `error` says why; the `.part` stays when the download can resume

While `downloading`, the transfer retries a dropped connection with exponential backoff
and continues from the bytes on disk with an HTTP `Range` request.  Each attempt's HTTP
exchange runs in a worker thread (`_exchange`: a blocking socket, the body written to
the `.part` by that thread); the transfer task reads the thread's counter every
`announce_interval` to announce the progress, and cancels an attempt by shutting its
socket down (the bytes received are written first).  Progress lives in memory; the
store gets the record when the download starts, when each connection's answer is
accepted (the size is then known), every `checkpoint_interval` seconds, and when it
ends: never a write per chunk.

Restart policy: a record still `downloading` when zenow stops (or crashes) is shown as
`failed` with error `interrupted: zenow stopped` on the next start, its `downloaded`
being the size of the `.part` on disk; downloading the same URL again resumes from it.
Nothing restarts on its own: a download costs the user's bandwidth, so only a request
starts one.

Limits (a hostile or careless server must not fill the disk):

* `settings.max_download_size`: a file announced larger (by `Content-Length`, or the
  total of a `Content-Range`) is refused at once; a body of unknown size is cut off as
  soon as more than that has arrived.  Either way the download ends `failed` with an
  error starting `too large:` and its `.part` is **deleted**: the file cannot be
  completed under the limit, so its bytes are of no use.
* `settings.download_free_margin`: a download of known size starts only when the
  bytes still to come leave at least the margin free on the file system of the
  models folder (`statvfs`, in a worker thread); a download of unknown size checks
  the free space again before each write of its buffer (about every MiB).  Either
  way it ends `failed` with an error starting `not enough disk space:` and its
  `.part` is **kept**: once space is freed, asking for the URL again resumes it.
  `DELETE /api/models/download?url=...&discard=true` removes it instead.

A file already at the target name is used, not fetched, only when it is known to be
the one asked for: this URL's earlier download completed it (the record says so and
its size still matches), or its SHA-256 is the one the request gives (hashed outside
the actor, by the caller).  Otherwise the request is refused with `FileAlreadyExists`
(409) and the file is left alone.

Credentials: a URL may carry `user:password@`.  The request line never does (they
travel as HTTP Basic auth, which is dropped on a redirect to another origin); every
text shown or logged carries the URL as `https://***@host/...`.  The record keeps
the URL as given (it is the download's key, and a resume after a restart needs the
credentials), so the store holds them; the routes show records redacted.

Redirects are followed by hand, at most `max_redirects` of them, without reading
their bodies: only to http or https, and never from https down to http.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal, NoReturn

import httpx
import outcome
import trio

from .. import __version__, metrics
from ..actor import Actor, ActorRef
from ..errors import DownloadFailed, DownloadNotFound, InvalidModelFile, InvalidRequest, ZenowError
from ..events import DownloadProgress
from ..servers import model_details, read_gguf_info
from ..settings import Settings, is_mode
from ..store import DownloadRecord, ModelDetails, Store
from . import _files as files
from ._exchange import Answer, BodyRules, Exchange
from ._exchange import Dropped as _Dropped
from ._exchange import Failure as _Failure
from ._exchange import accepted_range as _accepted_range
from ._exchange import amount as _amount
from ._exchange import write_failure as _write_failure
from ._redact import redact_text, redact_url
from ._target import DownloadTarget, path_in_folder

__all__ = [
    "CANCELLED",
    "INTERRUPTED",
    "DiscardedDownload",
    "DownloadActor",
    "DownloadPolicy",
    "Downloads",
    "FileAlreadyExists",
]

log = logging.getLogger(__name__)

#: `error` of a download the user cancelled.
CANCELLED = "cancelled"
#: `error` of a download that was running when zenow stopped.
INTERRUPTED = "interrupted: zenow stopped"
#: How the `error` of a download whose file is no model llama-server can load begins.
NOT_A_MODEL = "not a valid GGUF model file"
#: ... or of one whose server sent something else than a GGUF file.
NOT_GGUF = ("not a GGUF file", "the server's response is not a GGUF file")

#: Seconds a final record may take to reach the store when the transfer ends.
_STORE_WRITE_TIMEOUT = 5.0
#: Transfers whose HTTP exchange runs in a worker thread at once (more wait for a thread); their
#: own limiter, so that long transfers never hold the threads the store's work needs.
_TRANSFER_THREADS = 8

_Status = Literal["downloading", "completed", "failed"]


class FileAlreadyExists(InvalidRequest):
    """409: the file a download would create exists and is not known to be the one asked for.

    Nothing was fetched and the file was not touched.
    """

    status_code = 409

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(
            f"filename: {path} already exists and {why}; pick another filename or delete that file",
            param="filename", code="file_exists",
        )


@dataclass(frozen=True)
class DownloadPolicy:
    """Timing of downloads: retries, flushing, checkpoints and HTTP timeouts (seconds, bytes)."""

    #: Wait before the first retry of a dropped connection; doubles up to `backoff_max`.
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    #: Consecutive attempts that receive nothing before the download fails (progress resets it).
    attempts_without_progress: int = 8
    #: The most bytes one read of the body asks for (the size of the buffer it is read into).
    read_bytes: int = 1 << 20
    #: Received bytes are written to the `.part` once this many are held, or this often.
    flush_bytes: int = 1 << 20
    flush_interval: float = 0.5
    #: Written bytes are sent on their way to the disk every this many while the download goes on.
    write_back_bytes: int = 32 << 20
    #: How often a running download's progress is announced (the event hub paces it further).
    announce_interval: float = 0.1
    #: How often a running download's progress is saved to the store.
    checkpoint_interval: float = 5.0
    connect_timeout: float = 20.0
    #: A connection that delivers nothing for this long counts as dropped.
    read_timeout: float = 60.0
    #: Redirects one request follows before the download fails.
    max_redirects: int = 10
    #: Bytes free on the file system holding a folder (blocking; run in a worker thread).
    #: Raises `OSError`.  Tests put a nearly full disk here.
    free_space: Callable[[Path], int] = field(default=files.free_bytes)


@dataclass(frozen=True, slots=True)
class DiscardedDownload:
    """What `Downloads.discard` did: the download's last record, now forgotten."""

    record: DownloadRecord
    #: The download was running and discarding it cancelled it.
    cancelled: bool
    #: A `.part` of it was on disk and is deleted (a completed model file is never deleted).
    part_deleted: bool


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
    """An answer to `begin`: the record now, and the outcome to wait for while it runs (None: it does not)."""

    record: DownloadRecord
    outcome: _Outcome | None


@dataclass(frozen=True, slots=True)
class _Settling:
    """An answer to `begin` or `discard`: a cancelled transfer of the URL is still putting its
    files away; wait for it, then ask again."""

    outcome: _Outcome


@dataclass(frozen=True, slots=True)
class _CompareDigest:
    """An answer to `begin`: a file holds the name and only its SHA-256 can tell whether it is
    the one asked for.  The caller hashes it outside the actor and asks again with the digest."""

    existing: files.ExistingFile


@dataclass(eq=False)
class _Download:
    """One URL's download as the actor tracks it; only the actor and its tasks touch it."""

    target: DownloadTarget
    status: _Status
    downloaded: int
    total: int | None
    error: str | None
    #: Set while a transfer task runs (until its final record is published).
    outcome: _Outcome | None = None
    scope: trio.CancelScope | None = None
    cancel_requested: bool = False
    #: The SHA-256 of the `.part` so far, kept while writing when a digest is to be checked.
    digest: files.PartDigest | None = None

    @classmethod
    def of(cls, record: DownloadRecord) -> _Download | None:
        """The download a stored record describes; None for a record no download can come from."""
        if not is_mode(record.mode):
            return None
        target = DownloadTarget(record.url, record.filename, record.mode, record.sha256)
        return cls(target, record.status, record.downloaded, record.total, record.error)

    @property
    def running(self) -> bool:
        return self.outcome is not None

    def same_file(self, target: DownloadTarget) -> bool:
        return (self.target.mode, self.target.filename) == (target.mode, target.filename)

    def record(self) -> DownloadRecord:
        t = self.target
        return DownloadRecord(
            url=t.url, filename=t.filename, mode=t.mode, status=self.status,
            downloaded=self.downloaded, total=self.total, error=self.error, sha256=t.sha256,
        )


class DownloadActor(Actor):
    """Owns every download: its state, its task, its `.part` file; its HTTP exchanges run in worker threads."""

    def __init__(self, settings: Settings, store: Store, policy: DownloadPolicy | None = None) -> None:
        self._settings = settings
        self._store = store
        self._policy = policy or DownloadPolicy()
        self._downloads: dict[str, _Download] = {}
        self._threads = trio.CapacityLimiter(_TRANSFER_THREADS)

    # ------------------------------------------------------------ lifecycle

    async def setup(self) -> None:
        for record in await self._store.list_downloads():
            download = _Download.of(record)
            if download is None:
                log.warning("ignoring the stored download of %s: unknown mode %r",
                            redact_url(record.url), record.mode)
                continue
            if record.status == "downloading":
                download.status, download.error = "failed", INTERRUPTED
                download.downloaded = await trio.to_thread.run_sync(files.file_size, self._part_path(download.target))
                await self._store.save_download(download.record())
            self._downloads[record.url] = download

    # ------------------------------------------------------------ operations

    async def begin(
        self, target: DownloadTarget, digest: tuple[files.ExistingFile, str] | None = None
    ) -> _Begun | _Settling | _CompareDigest:
        """Start a download of `target`, join the one running for its URL, or use the file already there.

        `digest`: the SHA-256 the caller computed of a file this method asked it to hash
        (`_CompareDigest`), with what the file looked like then.  Raises `InvalidRequest`
        (another download writes the file; a running download of the URL to another
        file), `FileAlreadyExists`, `DownloadFailed` (the folder cannot be read).
        """
        current = self._downloads.get(target.url)
        if current is not None and current.running:
            assert current.outcome is not None
            if current.cancel_requested:
                return _Settling(current.outcome)
            _check_joinable(current.target, target)
            if target.sha256 and not current.target.sha256:
                current.target = replace(current.target, sha256=target.sha256)
            return _Begun(current.record(), current.outcome)
        for other in self._downloads.values():
            if other.running and other.same_file(target):
                raise InvalidRequest(
                    f"filename: {target.mode}/{target.filename} is already being downloaded"
                    f" from {other.target.shown_url}", param="filename",
                )

        final = self._final_path(target)
        try:
            existing = await trio.to_thread.run_sync(files.existing_file, final)
        except OSError as exc:
            raise DownloadFailed(f"Cannot check {final}: {exc.strerror or exc}") from exc
        if existing is not None:
            return await self._use_existing(target, existing, digest)

        await self._claim_part(target)
        on_disk = await trio.to_thread.run_sync(files.file_size, self._part_path(target))
        known_total = current.total if current is not None and current.same_file(target) else None
        download = _Download(target, "downloading", on_disk, known_total, None)
        await self._store.save_download(download.record())
        download.outcome = _Outcome()
        download.scope = trio.CancelScope()
        self._downloads[target.url] = download
        self._announce(download.record())
        self.nursery.start_soon(self._transfer, download, name=f"download {target.shown_url}")
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

    async def discard(self, url: str) -> DiscardedDownload | _Settling:
        """Forget the download of `url`: cancel it first when it runs, then delete its `.part` and its record.

        A running download answers `_Settling` (wait, then ask again).  A completed
        download's model file stays, and so does a `.part` another URL's download of the
        same file is writing or owns.  Raises `DownloadNotFound`, `DownloadFailed` (the
        `.part` cannot be deleted; then nothing is forgotten), `StoreError`.
        """
        download = self._find(url)
        if download.running:
            assert download.outcome is not None and download.scope is not None
            download.cancel_requested = True
            download.scope.cancel()
            return _Settling(download.outcome)
        target = download.target
        sharing = [o for o in self._downloads.values() if o is not download and o.same_file(target)]
        part_is_ours = download.status != "completed" and not any(o.running for o in sharing) and (
            download.downloaded > 0 or not any(o.status == "failed" and o.downloaded for o in sharing))
        last = download.record()
        part_deleted = False
        if part_is_ours:
            part = self._part_path(target)
            try:
                part_deleted = await trio.to_thread.run_sync(files.remove_file, part)
            except OSError as exc:
                raise DownloadFailed(f"Cannot delete {part}: {exc.strerror or exc}") from exc
            download.downloaded = 0  # true even when forgetting the record fails below
            for other in sharing:
                if other.downloaded and other.status == "failed":
                    other.downloaded = 0  # they pointed at the same .part
                    await self._checkpoint(other)
        await self._store.delete_download(target.url)
        del self._downloads[target.url]
        log.info("forgot the download of %s%s", target.shown_url, " and deleted its .part" if part_deleted else "")
        return DiscardedDownload(last, cancelled=False, part_deleted=part_deleted)

    async def _use_existing(
        self, target: DownloadTarget, existing: files.ExistingFile, digest: tuple[files.ExistingFile, str] | None
    ) -> _Begun | _CompareDigest:
        """Use the file at the target's name when it is known to be the one asked for; else `FileAlreadyExists`."""
        if not existing.is_gguf:
            raise FileAlreadyExists(existing.path, "is not a GGUF file")
        earlier = self._downloads.get(target.url)
        completed_here = earlier is not None and earlier.status == "completed" and earlier.same_file(target)
        ours = completed_here and earlier is not None and earlier.downloaded == existing.size
        if ours and earlier is not None and target.sha256 in (None, earlier.target.sha256):
            sha256 = earlier.target.sha256
        elif target.sha256 is not None:
            if digest is None or digest[0] != existing:
                return _CompareDigest(existing)
            if digest[1] != target.sha256:
                raise FileAlreadyExists(existing.path,
                                        f"its sha256 is {digest[1]}, not the {target.sha256} asked for")
            sha256 = target.sha256
        elif completed_here:
            raise FileAlreadyExists(existing.path, "is not the file this URL downloaded (its size changed)")
        else:
            raise FileAlreadyExists(existing.path, "was not downloaded from this URL")
        details = model_details(await trio.to_thread.run_sync(read_gguf_info, existing.path))
        await self._store.register_model(target.mode, target.model_name, str(existing.path), target.shown_url,
                                         existing.size, details)
        download = _Download(replace(target, sha256=sha256), "completed", existing.size, existing.size, None)
        await self._store.save_download(download.record())
        self._downloads[target.url] = download
        self._announce(download.record())
        log.info("%s: using the file already at %s", target.shown_url, existing.path)
        return _Begun(download.record(), None)

    async def _claim_part(self, target: DownloadTarget) -> None:
        """Discard a `.part` of the same file left by a download of another URL: its bytes are not ours."""
        for other in self._downloads.values():
            if (other.target.url != target.url and other.status == "failed" and other.downloaded
                    and other.same_file(target)):
                log.info("%s replaces the partial download of %s", target.shown_url, other.target.shown_url)
                try:
                    await trio.to_thread.run_sync(files.remove_file, self._part_path(target))
                except OSError as exc:
                    raise DownloadFailed(f"Cannot remove {self._part_path(target)}: {exc.strerror}") from exc
                other.downloaded = 0
                await self._store.save_download(other.record())

    def _find(self, url: str) -> _Download:
        """The download of `url`, as the client sent it or as answers show it (credentials redacted).

        Raises `DownloadNotFound`.
        """
        download = self._downloads.get(url)
        if download is None:
            shown_as = [d for d in self._downloads.values() if d.target.shown_url == url]
            if len(shown_as) == 1:
                download = shown_as[0]
        if download is None:
            raise DownloadNotFound(f"No download for url {redact_url(url)!r}")
        return download

    def _announce(self, record: DownloadRecord) -> None:
        """Tell listeners where a download is (the hub paces progress to a few events a second)."""
        self._store.events.publish(DownloadProgress.of(record))

    def _final_path(self, target: DownloadTarget) -> Path:
        return path_in_folder(self._settings.mode_dir(target.mode), target.filename)

    def _part_path(self, target: DownloadTarget) -> Path:
        return files.part_path_of(self._final_path(target))

    # ------------------------------------------------------------ the transfer task

    async def _transfer(self, download: _Download) -> None:
        """Run one download to its end and publish the final record; never raises but Cancelled."""
        outcome, scope = download.outcome, download.scope
        assert outcome is not None and scope is not None
        shown = download.target.shown_url
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
                    log.warning("download of %s: cannot remove its .part: %s", shown, exc)
        except OSError as exc:
            error = f"file error: {exc}"
        except Exception as exc:  # a bug must fail this download, not every other one
            log.exception("download of %s failed unexpectedly", shown)
            error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            download.status = "completed" if error is None else "failed"
            download.error = None if error is None else redact_text(error)
            download.outcome = download.scope = None
            record = download.record()
            expected = error in (None, CANCELLED, INTERRUPTED)
            with trio.CancelScope(shield=True), trio.move_on_after(_STORE_WRITE_TIMEOUT):
                try:
                    await self._store.save_download(record)
                except ZenowError as exc:
                    # at shutdown the store may stop first; the next start marks the record itself
                    log.log(logging.INFO if error == INTERRUPTED else logging.WARNING,
                            "could not save the state of the download of %s: %s", shown, exc)
            outcome.publish(record)
            self._announce(record)
            if error is None:
                log.info("downloaded %s to %s", shown, self._final_path(download.target))
            else:
                log.log(logging.INFO if expected else logging.WARNING,
                        "download of %s ended: %s", shown, download.error)

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
                log.info("download of %s: %s; retrying in %.1f s", target.shown_url, dropped.reason, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, policy.backoff_max)

        size, details = await self._verify(download, part)
        final = self._final_path(target)
        with trio.CancelScope(shield=True):  # once renamed, the model is registered whatever happens
            await trio.to_thread.run_sync(files.promote, part, final)
            download.downloaded = download.total = size
            try:
                await self._store.register_model(target.mode, target.model_name, str(final), target.shown_url, size,
                                                 details)
            except ZenowError as exc:
                raise _Failure(f"downloaded, but registering the model failed: {exc}") from exc

    async def _verify(self, download: _Download, part: Path) -> tuple[int, ModelDetails]:
        """The size of the complete `.part` and what its GGUF header says, once its size, header and
        digest check; else `_Failure`."""
        target = download.target
        size = await trio.to_thread.run_sync(files.file_size, part)
        if download.total is not None and size != download.total:
            raise _Failure(f"size mismatch: got {size} bytes, expected {download.total}", discard_part=True)
        if not await trio.to_thread.run_sync(files.has_gguf_magic, part):
            raise _Failure("not a GGUF file (it does not start with the GGUF magic)", discard_part=True)
        try:
            info = await trio.to_thread.run_sync(read_gguf_info, part)
        except InvalidModelFile as exc:
            raise _Failure(f"{NOT_A_MODEL}: {str(exc).replace(str(part), part.name)}", discard_part=True) from None
        if target.sha256 is not None:
            kept = download.digest
            digest = (kept.hexdigest() if kept is not None and kept.size == size
                      else await trio.to_thread.run_sync(files.sha256_of, part))
            if digest != target.sha256:
                raise _Failure(f"sha256 mismatch: expected {target.sha256}, got {digest}", discard_part=True)
        return size, model_details(info)

    async def _attempt(self, download: _Download, part: Path) -> None:
        """One HTTP request: continue the `.part` from its size to the end of the body.

        The exchange runs in a worker thread (`_exchange`); this task follows it.
        Raises `_Dropped` when the attempt ended early (retry), `_Failure` when the
        download cannot succeed.  Cancelling it shuts the connection down and returns
        once the thread has written what it received.
        """
        offset = await trio.to_thread.run_sync(files.file_size, part)
        if offset and not await trio.to_thread.run_sync(files.is_gguf_prefix, part):
            offset = 0  # a .part that cannot begin a GGUF file is not worth resuming
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        target = download.target
        exchange = Exchange(self._policy, f"zenow/{__version__}")
        try:
            # nothing is written while the answer is awaited: a cancel may leave the thread behind
            # (it closes its connection itself), so a connect that hangs never holds the cancel up
            answer = await trio.to_thread.run_sync(
                partial(_opened, exchange, target.request_url, target.authorization, headers),
                limiter=self._threads, abandon_on_cancel=True)
        except trio.Cancelled:
            exchange.abort()
            raise
        try:
            if offset and answer.status == 200:
                log.info("%s ignored the range request; starting over", redact_url(str(answer.url)))
            offset, total = _accepted_range(answer, offset, download.total)
            self._check_size(total)
            download.downloaded, download.total = offset, total
            self._announce(download.record())
            if total is not None and offset == total:
                return  # a 416 for a .part that was already complete
            await self._check_room(part.parent, 0 if total is None else total - offset,
                                   size_known=total is not None, received=offset)
            refused = answer.not_gguf()
            if refused is not None:
                raise refused
            await self._receive(download, exchange, answer, part, offset)
        finally:
            exchange.close()

    def _check_size(self, total: int | None) -> None:
        """Raise `_Failure` (the `.part` goes) when the announced size is over `max_download_size`."""
        limit = self._settings.max_download_size
        if total is not None and total > limit:
            raise _Failure(f"too large: the server announces {_amount(total)}, over the limit of"
                           f" {_amount(limit)} (max_download_size)", discard_part=True)

    async def _check_room(self, directory: Path, needed: int, *, size_known: bool, received: int) -> None:
        """Raise `_Failure` (the `.part` stays) unless writing `needed` more bytes leaves the margin free."""
        room = await self._room(directory)
        if needed <= room:
            return
        self._no_room(directory, needed, room, size_known=size_known, received=received)

    async def _room(self, directory: Path) -> int:
        """Bytes that may still be written in `directory` with the margin left free (may be < 0).

        Raises `_Failure` when the free space cannot be read.
        """
        return await trio.to_thread.run_sync(self._room_now, directory)

    def _room_now(self, directory: Path) -> int:
        """`_room`, blocking (for a worker thread)."""
        try:
            free = self._policy.free_space(directory)
        except OSError as exc:
            raise _Failure(f"cannot check the free disk space in {directory}: {exc.strerror or exc}") from exc
        return free - self._settings.download_free_margin

    def _no_room(self, directory: Path, needed: int, room: int, *, size_known: bool, received: int) -> NoReturn:
        """Raise the `_Failure` of a download that needs `needed` more bytes where `room` may be written."""
        margin = self._settings.download_free_margin
        free = room + margin
        keep = f"and {_amount(margin)} must stay free (download_free_margin)"
        if size_known:
            raise _Failure(f"not enough disk space: the download needs {_amount(needed)} more,"
                           f" {_amount(free)} are free in {directory}, {keep}")
        raise _Failure(f"not enough disk space: {_amount(free)} free in {directory} after {_amount(received)}"
                       f" of a file whose size the server did not announce, {keep}")

    async def _receive(self, download: _Download, exchange: Exchange, answer: Answer, part: Path,
                       offset: int) -> None:
        """Write the body to the `.part` from `offset` (in the exchange's worker thread); it is
        synced once the body is complete.

        This task announces the progress every `announce_interval` and saves it every
        `checkpoint_interval`, from the thread's counters: the body never passes through
        the event loop.  Raises what `Exchange.receive` raises: `_Dropped` when the body
        ends early, `_Failure` when it is not a GGUF file, is longer than announced or
        than `max_download_size`, or the disk has no room for it.  Cancelling it shuts the
        connection down; it returns (raising `Cancelled`) once the thread has written
        what it held and the file is closed.
        """
        policy, mode = self._policy, download.target.mode
        if download.target.sha256 is not None and download.digest is None:
            download.digest = files.PartDigest()
        directory = part.parent
        accepted = download.record()  # the size is known now: worth keeping (saved while the body comes)

        def no_room(needed: int, room: int, received: int) -> NoReturn:
            self._no_room(directory, needed, room, size_known=False, received=received)

        rules = BodyRules(offset, download.total, self._settings.max_download_size,
                          partial(self._room_now, directory), no_room)
        counted = 0  # this attempt's bytes already in the metrics

        def take_progress() -> None:
            nonlocal counted
            received = exchange.received
            download.downloaded = offset + received
            if received > counted:
                metrics.download_bytes(mode, received - counted)
                counted = received

        async def follow() -> None:
            """Announce and save the progress until cancelled; then stop the exchange."""
            last_checkpoint, announced = trio.current_time(), download.downloaded
            try:
                await self._checkpoint(download, accepted)
                while True:
                    await trio.sleep(policy.announce_interval)
                    take_progress()
                    if download.downloaded != announced:
                        self._announce(download.record())
                        announced = download.downloaded
                    if trio.current_time() - last_checkpoint >= policy.checkpoint_interval:
                        await self._checkpoint(download)
                        last_checkpoint = trio.current_time()
            finally:
                exchange.abort()  # a no-op once the thread returned

        try:
            async with trio.open_nursery() as following:
                following.start_soon(follow)
                try:
                    # not abandoned on cancel: `follow` shuts the socket down and the thread returns
                    # once what it received is written
                    result = await trio.to_thread.run_sync(
                        partial(outcome.capture, _write_body, exchange, part, download.digest, rules, answer),
                        limiter=self._threads)
                finally:
                    following.cancel_scope.cancel()
        finally:
            take_progress()
        result.unwrap()

    async def _checkpoint(self, download: _Download, record: DownloadRecord | None = None) -> None:
        """Save the download's record (or `record`, an earlier one of it); a store error is logged."""
        try:
            await self._store.save_download(record or download.record())
        except ZenowError as exc:
            log.warning("could not checkpoint the download of %s: %s", download.target.shown_url, exc)


def _check_joinable(running: DownloadTarget, asked: DownloadTarget) -> None:
    """Raise `InvalidRequest` when a request for a running URL asks for a different file."""
    if asked.mode != running.mode:
        raise InvalidRequest(f"mode: {running.shown_url} is already downloading for mode {running.mode!r}",
                             param="mode")
    if asked.filename != running.filename:
        raise InvalidRequest(f"filename: {running.shown_url} is already downloading as {running.filename!r}",
                             param="filename")
    if asked.sha256 and running.sha256 and asked.sha256 != running.sha256:
        raise InvalidRequest(f"sha256: {running.shown_url} is already downloading with a different sha256",
                             param="sha256")


def _opened(exchange: Exchange, url: httpx.URL, authorization: str | None, headers: dict[str, str]) -> Answer:
    """`exchange.open`, in a worker thread the caller may abandon: the connection is closed
    unless the answer is handed over."""
    try:
        answer = exchange.open(url, authorization, headers)
        if exchange.aborted:
            raise _Dropped("aborted")
    except BaseException:
        exchange.close()
        raise
    return answer


def _write_body(exchange: Exchange, part: Path, digest: files.PartDigest | None, rules: BodyRules,
                answer: Answer) -> None:
    """Open the `.part` at `rules.offset`, write the body to it (`Exchange.receive`) and close it.

    In a worker thread nobody abandons: the file is closed when this returns.
    """
    try:
        writer = files.PartFile(part, rules.offset, digest)
    except OSError as exc:
        exchange.close()
        raise _write_failure(part, exc) from exc
    try:
        exchange.receive(writer, rules, answer)
    finally:
        try:
            writer.close()
        except OSError as exc:
            log.warning("closing %s: %s", part, exc)


class Downloads:
    """Typed access to the download actor.

    Every method raises `ActorUnavailable` when the download actor is down.
    """

    def __init__(self, ref: ActorRef[DownloadActor]) -> None:
        self._ref = ref

    async def start(self, url: str, filename: str | None, mode: str, sha256: str | None = None) -> DownloadRecord:
        """Start downloading `url` to `models/<mode>/<filename>`, or join its running download.

        Returns with the current record: `downloading`, or `completed` when a file is
        already at that name and known to be the one asked for (this URL's earlier
        download completed it, or its SHA-256 is `sha256`; that file is hashed first,
        so the answer may take a while): nothing is fetched then, and the model is
        registered.  `filename` None takes the URL path's last segment.

        Raises `InvalidRequest` naming the bad field (`url`, `filename`, `sha256`; also a
        running download of the URL to another file, or another URL's running download
        to this file), `InvalidMode`, `FileAlreadyExists` (409) when another file holds
        the name, `DownloadFailed` when the models folder cannot be read; nothing is
        written then.  Cancelling the caller may leave the download started.
        """
        return (await self._begin(DownloadTarget.check(url, filename, mode, sha256))).record

    async def fetch(self, url: str, filename: str | None, mode: str, sha256: str | None = None) -> DownloadRecord:
        """Like `start`, then wait for the download to end; return its `completed` record.

        Raises what `start` raises, and, with the reason when it ends in `failed`,
        `InvalidModelFile` (the file is no GGUF model llama-server can load) or `DownloadFailed`.
        Cancelling the caller stops the waiting, not the download.
        """
        target = DownloadTarget.check(url, filename, mode, sha256)
        begun = await self._begin(target)
        record = begun.record if begun.outcome is None else await begun.outcome.wait()
        if record.status != "completed":
            refused = InvalidModelFile if (record.error or "").startswith((NOT_A_MODEL, *NOT_GGUF)) else DownloadFailed
            raise refused(f"Download of {target.shown_url} failed: {record.error}")
        return record

    async def status(self, url: str) -> DownloadRecord:
        """The record of `url` (of this run, or kept from an earlier one); raises `DownloadNotFound`.

        `url` may be the URL as given or as answers show it (credentials as `***`).
        """
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

    async def discard(self, url: str) -> DiscardedDownload:
        """Cancel the download of `url` if it runs, delete its `.part` and forget its record.

        A completed download's model file is kept (only its record goes); a `.part`
        that another URL's download of the same file writes or owns is kept too.
        Raises `DownloadNotFound`, `DownloadFailed` when the `.part` cannot be deleted,
        `StoreError`.  Cancelling the caller after the download stopped leaves it
        cancelled with its `.part` (as `cancel` does).
        """
        cancelled = False
        while True:
            answer = await self._ref.call(DownloadActor.discard, url)
            if isinstance(answer, DiscardedDownload):
                return replace(answer, cancelled=cancelled)
            cancelled = True
            await answer.outcome.wait()

    async def _begin(self, target: DownloadTarget) -> _Begun:
        digest: tuple[files.ExistingFile, str] | None = None
        while True:
            answer = await self._ref.call(DownloadActor.begin, target, digest)
            if isinstance(answer, _Begun):
                return answer
            if isinstance(answer, _Settling):
                await answer.outcome.wait()
                digest = None
                continue
            # hashed here, in the caller's task: a big file would hold the actor for seconds
            path = answer.existing.path
            try:
                digest = (answer.existing, await trio.to_thread.run_sync(files.sha256_of, path,
                                                                          abandon_on_cancel=True))
            except FileNotFoundError:
                digest = None  # gone meanwhile: ask again, and it is downloaded
            except OSError as exc:
                raise DownloadFailed(f"Cannot read {path}: {exc.strerror or exc}") from exc

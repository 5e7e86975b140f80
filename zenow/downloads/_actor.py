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

import errno
import http
import logging
import re
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, NoReturn

import httpx
import trio

from .. import __version__, metrics
from ..actor import Actor, ActorRef
from ..errors import DownloadFailed, DownloadNotFound, InvalidModelFile, InvalidRequest, ZenowError
from ..events import DownloadProgress
from ..servers import model_details, read_gguf_info
from ..settings import Settings, is_mode
from ..store import DownloadRecord, ModelDetails, Store
from . import _files as files
from ._headers import content_length, parse_content_range
from ._redact import redact_text, redact_url
from ._sink import PartSink
from ._target import DownloadTarget, path_in_folder
from ._transport import WideReadTransport

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
    #: The most bytes one read of the body asks for.
    read_bytes: int = 1 << 20
    #: Received bytes are written to the `.part` once this many are buffered, or this often.
    flush_bytes: int = 1 << 20
    flush_interval: float = 0.5
    #: Written bytes are put on the disk every this many while the download goes on.
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
            follow_redirects=False,  # followed by hand in `_open`: schemes checked, bodies unread
            trust_env=False,
            transport=WideReadTransport(p.read_bytes),
            # byte offsets must be the file's, so no compression on the wire
            headers={"Accept-Encoding": "identity", "User-Agent": f"zenow/{__version__}"},
        )
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

    async def teardown(self) -> None:
        if self._client is not None:
            await self._client.aclose()

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

        Raises `_Dropped` when the attempt ended early (retry), `_Failure` when the
        download cannot succeed.
        """
        offset = await trio.to_thread.run_sync(files.file_size, part)
        if offset and not await trio.to_thread.run_sync(files.is_gguf_prefix, part):
            offset = 0  # a .part that cannot begin a GGUF file is not worth resuming
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            async with self._open(download.target, headers) as response:
                offset, total = _accepted_range(response, offset, download.total)
                self._check_size(total)
                download.downloaded, download.total = offset, total
                self._announce(download.record())
                if total is not None and offset == total:
                    return  # a 416 for a .part that was already complete
                await self._check_room(part.parent, 0 if total is None else total - offset,
                                       size_known=total is not None, received=offset)
                await self._checkpoint(download)  # the size is known now: worth keeping
                await self._receive(download, response, part, offset)
        except httpx.HTTPError as exc:
            raise _translate(exc) from exc

    @asynccontextmanager
    async def _open(self, target: DownloadTarget, headers: dict[str, str]) -> AsyncIterator[httpx.Response]:
        """The streamed response to a GET of the target, redirects followed; closed on exit.

        The URL's credentials go as Basic auth on the first request (httpx keeps the
        header only on redirects within the origin or up to https).  A redirect's body
        is never read.  Raises `_Failure` for a redirect to a scheme other than http(s),
        from https down to http, or past `max_redirects`; `httpx.HTTPError`.
        """
        assert self._client is not None
        request = self._client.build_request("GET", target.request_url, headers=headers)
        auth = target.auth
        for _ in range(self._policy.max_redirects + 1):
            response = await self._client.send(request, auth=auth, stream=True, follow_redirects=False)
            following = response.next_request
            if following is None:
                try:
                    yield response
                finally:
                    await response.aclose()
                return
            await response.aclose()
            _check_redirect(request.url, following.url)
            request, auth = following, None  # the Authorization header went along where it may
        raise _Failure(f"too many redirects (more than {self._policy.max_redirects})")

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
        try:
            free = await trio.to_thread.run_sync(self._policy.free_space, directory)
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

    async def _receive(self, download: _Download, response: httpx.Response, part: Path, offset: int) -> None:
        """Write the body to the `.part` from `offset`; flush and fsync it when the body is complete.

        The body is read in large chunks and written in batches by a worker thread while
        the next batch arrives; progress is announced at most every `announce_interval`.
        Raises `_Dropped` when the body ends early, `_Failure` when the body is not a
        GGUF file, is longer than announced or than `max_download_size`, or the disk
        has no room for it.
        """
        policy, total = self._policy, download.total
        limit = self._settings.max_download_size
        if download.target.sha256 is not None and download.digest is None:
            download.digest = files.PartDigest()
        try:
            writer = await trio.to_thread.run_sync(files.PartFile, part, offset, download.digest)
        except OSError as exc:
            raise _write_failure(part, exc) from exc
        received = 0
        # the file's first bytes until the GGUF magic is checked (a resumed .part's were checked before
        # the request: they are the magic, or a piece of it when the first connection dropped that early)
        magic_checked = offset >= len(files.GGUF_MAGIC)
        head = files.GGUF_MAGIC[:offset]
        failed = False
        last_flush = last_checkpoint = last_announce = trio.current_time()

        sink = PartSink(writer, policy.write_back_bytes)

        async def flush() -> None:
            """Start writing what is buffered (the batch before it written first)."""
            if not sink.buffered:
                return
            try:
                if total is None:  # nobody said how much is coming: look at the disk as it fills
                    await sink.settle()
                    room = await self._room(part.parent)
                    if sink.buffered > room:  # what still fits is kept for a resume once space is freed
                        needed = sink.buffered
                        sink.keep_first(max(room, 0))
                        await sink.write_all()
                        self._no_room(part.parent, needed, room, size_known=False,
                                      received=download.downloaded - needed + max(room, 0))
                await sink.write_buffered()
            except OSError as exc:
                raise _write_failure(part, exc) from exc

        try:
            try:
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    download.downloaded += len(chunk)
                    metrics.download_bytes(download.target.mode, len(chunk))
                    if not magic_checked:
                        head += chunk[:len(files.GGUF_MAGIC)]
                        if len(head) >= len(files.GGUF_MAGIC):
                            if not head.startswith(files.GGUF_MAGIC):
                                raise _Failure(f"the server's response is not a GGUF file ({_described(response)})",
                                               discard_part=True)
                            magic_checked = True
                    sink.add(chunk)
                    if total is not None and download.downloaded > total:
                        raise _Failure(f"the server sent more than the {total} bytes it announced",
                                       discard_part=True)
                    if total is None and download.downloaded > limit:
                        raise _Failure(f"too large: the server sent more than {_amount(limit)} without"
                                       f" announcing a size; the limit is {_amount(limit)} (max_download_size)",
                                       discard_part=True)
                    now = trio.current_time()
                    if magic_checked and (sink.buffered >= policy.flush_bytes
                                          or now - last_flush >= policy.flush_interval):
                        await flush()
                        last_flush = now
                    if now - last_announce >= policy.announce_interval:
                        self._announce(download.record())
                        last_announce = now
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
                await sink.settle_all()
                await trio.to_thread.run_sync(writer.sync)
            except OSError as exc:
                raise _write_failure(part, exc) from exc
        except _Failure:
            failed = True  # what is still buffered is not worth the disk: no GGUF, too much, no room
            sink.drop_buffered()
            raise
        finally:
            with trio.CancelScope(shield=True):
                if not failed:
                    # whatever arrived is kept for a resume, even when the transfer is being cancelled
                    try:
                        await flush()
                        await sink.settle()
                    except _Failure as failure:
                        log.warning("download of %s: %s", download.target.shown_url, failure.reason)
                    except OSError as exc:
                        log.warning("download of %s: %s", download.target.shown_url,
                                    _write_failure(part, exc).reason)
                with suppress(Exception):
                    await sink.settle_all()  # a thread still writing: the file stays open until it is done
                try:
                    await trio.to_thread.run_sync(writer.close)
                except OSError as exc:
                    log.warning("download of %s: closing %s: %s", download.target.shown_url, part, exc)

    async def _checkpoint(self, download: _Download) -> None:
        try:
            await self._store.save_download(download.record())
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


_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]{0,19}")


def _check_redirect(origin: httpx.URL, target: httpx.URL) -> None:
    """Raise `_Failure` for a redirect zenow does not follow: to a scheme other than http(s), or https -> http."""
    scheme = target.scheme
    if scheme not in ("http", "https"):
        shown = repr(scheme) if _SCHEME.fullmatch(scheme) else "that is not http"
        raise _Failure(f"redirect refused: {redact_url(str(origin))} redirected to a URL with scheme {shown};"
                       " only http and https URLs are followed")
    if origin.scheme == "https" and scheme == "http":
        raise _Failure(f"redirect refused: {redact_url(str(origin))} redirected from https down to plain http")


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
            log.info("%s ignored the range request; starting over", redact_url(str(response.url)))
        return 0, content_length(response.headers)
    if status == 416 and offset:
        cr = parse_content_range(response.headers.get("content-range"))
        if cr is not None and cr.complete == offset:
            return offset, offset
        raise _Dropped("the server refused to resume", start_over=True)
    reason = _status_text(status)
    if status in (408, 425, 429) or status >= 500:
        raise _Dropped(reason)
    raise _Failure(f"{reason} from {redact_url(str(response.url))}", discard_part=True)


def _status_text(status: int) -> str:
    """`HTTP 404 Not Found`: the standard phrase, never the one the server sent."""
    try:
        return f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+\-]{1,64}/[a-z0-9!#$&^_.+\-]{1,64}")


def _described(response: httpx.Response) -> str:
    """`HTTP 200, text/html`: the status and the media type of a response, never its content."""
    raw = response.headers.get("content-type")
    if raw is None:
        media = "no Content-Type"
    else:
        media = raw.split(";", 1)[0].strip().lower()
        if not _MEDIA_TYPE.fullmatch(media):
            media = "an unreadable Content-Type"
    return f"HTTP {response.status_code}, {media}"


def _translate(exc: httpx.HTTPError) -> _Dropped | _Failure:
    """An httpx error as a retry (a dropped or stalled connection) or a failure (TLS...).

    The text never quotes what the server sent: a protocol error is named by the
    parser's complaint only (h11 appends the offending bytes after a colon).
    """
    tls = _tls_cause(exc)
    if tls is not None:
        return _Failure(f"TLS error: {tls}")
    name = type(exc).__name__
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.LocalProtocolError)):
        complaint = str(exc).split(":", 1)[0].strip()[:200]
        return _Dropped(f"{name}: {complaint}" if complaint else name)
    if isinstance(exc, (httpx.TimeoutException, httpx.NetworkError)):
        return _Dropped(f"{name}: {exc}" if str(exc) else name)
    return _Failure(f"{name}: {redact_text(str(exc))}" if str(exc) else name)


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


def _amount(size: int) -> str:
    """A byte count for people: `512 bytes`, `256 KiB`, `1.5 GiB`."""
    if size < 1024:
        return f"{size} bytes"
    value, unit = size / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f}".removesuffix(".0") + f" {unit}"


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

"""Spec sections 1.4, 1.5 and 1.8: model downloads, their progress, the default URLs; and cancel.

Beyond the spec: `DELETE /api/models/download?url=...` cancels a running download
(its `.part` stays for a resume), and with `&discard=true` also deletes the `.part`
and forgets the record.  Every URL shown has its credentials replaced by `***`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from quart import Blueprint
from quart_schema import validate_querystring, validate_request

from ..downloads import CANCELLED, DiscardedDownload, Downloads, progress_percent, redact_text, redact_url
from ..store import DownloadRecord
from ._context import services
from ._shapes import DefaultUrls, DownloadStarted, DownloadStatusAnswer, DownloadStopped, documented

bp = Blueprint("downloads", __name__)


class StartDownload(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    url: str
    filename: str | None = None
    mode: str = "llm"
    #: Beyond the spec: the hex SHA-256 the file must have.
    sha256: str | None = None


class StatusQuery(BaseModel):
    url: str | None = None


class CancelQuery(BaseModel):
    url: str
    #: Beyond the spec: also delete the `.part` and forget the record.
    discard: bool = False


def _downloads() -> Downloads:
    return services().downloads


@bp.post("/api/models/download")
@documented(DownloadStarted, 404, 409, 507)
@validate_request(StartDownload)
async def start_download(data: StartDownload) -> dict[str, object]:
    record = await _downloads().start(data.url, data.filename, data.mode, data.sha256)
    if record.status == "completed":
        message = f"Already downloaded: the existing file {record.mode}/{record.filename} is used; nothing was fetched"
    else:
        message = "Download started"
    return {"success": True, "url": redact_url(data.url), "mode": data.mode, "message": message}


@bp.get("/api/models/download/status")
@documented(DownloadStatusAnswer, 404)
@validate_querystring(StatusQuery)
async def download_status(query_args: StatusQuery) -> dict[str, object]:
    if query_args.url is None:
        return {"success": True, "downloads": [download_json(r) for r in await _downloads().all()]}
    return {"success": True, "download": download_json(await _downloads().status(query_args.url))}


@bp.delete("/api/models/download")
@documented(DownloadStopped, 404)
@validate_querystring(CancelQuery)
async def cancel_download(query_args: CancelQuery) -> dict[str, object]:
    if query_args.discard:
        discarded = await _downloads().discard(query_args.url)
        return {"success": True, "message": discard_message(discarded), "discarded": True,
                "download": download_json(discarded.record)}
    record = await _downloads().cancel(query_args.url)
    message = "Download cancelled" if record.error == CANCELLED else f"Download is not running ({record.status})"
    return {"success": True, "message": message, "download": download_json(record)}


@bp.get("/api/downloads/default-urls")
@documented(DefaultUrls)
async def default_urls() -> dict[str, object]:
    settings = services().settings
    return {"urls": {mode: list(urls) for mode, urls in settings.default_urls.items()},
            "browser_path": settings.browser_path}


def download_json(record: DownloadRecord) -> dict[str, object]:
    """A download as the spec shows it (section 1.5), credentials in its URL replaced by `***`."""
    return {
        "url": redact_url(record.url),
        "filename": record.filename,
        "status": record.status,
        "downloaded": record.downloaded,
        "total": record.total,
        "progress": progress_percent(record),
        "error": None if record.error is None else redact_text(record.error),
    }


def discard_message(discarded: DiscardedDownload) -> str:
    """What a discard did, in words."""
    if discarded.record.status == "completed":
        return "Download record removed; the downloaded model file is kept"
    done = "Download cancelled and discarded" if discarded.cancelled else "Download discarded"
    if discarded.part_deleted:
        return f"{done}: its partial file was deleted and its record removed"
    return f"{done}: its record was removed (no partial file of it was on disk)"

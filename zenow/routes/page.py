"""The page: `GET /` and its static files, shipped inside the package (`zenow/web/`).

The page is plain ES modules and CSS, no build step.  Its files are read once (in a
worker thread) and served from memory:

* `GET /` answers `index.html` with `Cache-Control: no-cache` and an `ETag`, so a
  browser asks again each time and gets a 304 while nothing changed.
* Every other file is served at `/assets/<version>/<path>`, where `<version>` is a
  digest of all the page's files: a changed file changes every asset URL, so assets
  are cached for a year (`immutable`).  `index.html` names its assets through the
  `{{version}}` placeholder; modules import each other by relative paths, which stay
  inside the same version.  An asset asked for under another version answers 404.

Every answer of this blueprint carries a strict Content-Security-Policy (only this
origin's own scripts, styles and connections; no inline script or style; no framing),
`X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`.

The page and its assets need no API key (`is_public_page_path`): they hold no data,
and the page asks for the key itself before it calls `/api`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

import trio
from quart import Blueprint, Response, request
from quart_schema import hide
from werkzeug.exceptions import NotFound

__all__ = ["ASSET_MAX_AGE", "CONTENT_SECURITY_POLICY", "PageFiles", "bp", "is_public_page_path", "read_page_files"]

bp = Blueprint("page", __name__)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: Seconds a browser may keep a versioned asset (a year: its URL changes with its content).
ASSET_MAX_AGE = 365 * 24 * 3600
ASSET_PREFIX = "/assets/"

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".md": "text/plain; charset=utf-8",
}
#: Licence files keep their upstream names (no suffix).
_LICENCE = re.compile(r"^LICEN[CS]E(-[A-Z]+)?$")
_VERSION_PLACEHOLDER = b"{{version}}"


def is_public_page_path(path: str) -> bool:
    """Whether `path` is the page or one of its assets (served without an API key)."""
    return path == "/" or path.startswith(ASSET_PREFIX)


def _content_type(name: str) -> str | None:
    leaf = name.rsplit("/", 1)[-1]
    if _LICENCE.match(leaf):
        return "text/plain; charset=utf-8"
    suffix = leaf[leaf.rfind("."):] if "." in leaf else ""
    return _CONTENT_TYPES.get(suffix)


@dataclass(frozen=True)
class PageFiles:
    """The page's files as served: `index` with its version filled in, `assets` by relative path."""

    version: str
    index: bytes
    assets: dict[str, tuple[bytes, str]]


def read_page_files(root: Traversable | None = None) -> PageFiles:
    """Read the page's files under `root` (default: the installed `zenow/web/`).

    Only files of a known type are served (HTML, JS, CSS, SVG, licences, notes); others
    (editor backups, say) are skipped.  Blocking: call it in a worker thread.
    Raises `FileNotFoundError` when `index.html` is missing.
    """
    root = root if root is not None else files("zenow").joinpath("web")
    found: dict[str, tuple[bytes, str]] = {}

    def walk(folder: Traversable, prefix: str) -> None:
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.startswith((".", "__")):
                continue
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
            elif (kind := _content_type(entry.name)) is not None:
                found[prefix + entry.name] = (entry.read_bytes(), kind)

    walk(root, "")
    index_template = found.pop("index.html", (None, ""))[0]
    if index_template is None:
        raise FileNotFoundError(f"the page's index.html is missing from {root}")
    digest = hashlib.sha256(index_template)
    for name, (content, _) in sorted(found.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    version = digest.hexdigest()[:16]
    return PageFiles(version, index_template.replace(_VERSION_PLACEHOLDER, version.encode()), found)


class _Loaded:
    """The page's files, read on first use and kept (they change only with the package)."""

    def __init__(self) -> None:
        self._files: PageFiles | None = None
        self._lock = trio.Lock()

    async def get(self) -> PageFiles:
        if self._files is None:
            async with self._lock:
                if self._files is None:
                    self._files = await trio.to_thread.run_sync(read_page_files)
        return self._files


_page_files = _Loaded()


@bp.after_request
async def page_security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.get("/")
@hide
async def index() -> Response:
    """The page itself: never cached without asking (`no-cache` + `ETag`)."""
    page = await _page_files.get()
    etag = f'"{page.version}"'
    if etag in [tag.strip() for tag in request.headers.get("If-None-Match", "").split(",")]:
        response = Response(b"", status=304)
    else:
        response = Response(page.index, status=200, content_type="text/html; charset=utf-8")
    response.headers["ETag"] = etag
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/assets/<version>/<path:name>")
@hide
async def asset(version: str, name: str) -> Response:
    """One of the page's files, cached for a year under its version."""
    page = await _page_files.get()
    found = page.assets.get(name) if version == page.version else None
    if found is None:
        raise NotFound(f"No page asset {name!r} in version {version!r} (the page is at version {page.version})")
    content, kind = found
    response = Response(content, status=200, content_type=kind)
    response.headers["Cache-Control"] = f"public, max-age={ASSET_MAX_AGE}, immutable"
    return response

"""What to download and where to: a request checked before anything is written.

Trio-free: these functions only look at strings.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from ..errors import InvalidMode, InvalidRequest
from ..settings import Mode, is_mode
from ._redact import redact_url

__all__ = [
    "DownloadTarget",
    "check_filename",
    "check_sha256",
    "check_url",
    "filename_from_url",
    "model_name_of",
    "path_in_folder",
]

GGUF_SUFFIX = ".gguf"
#: Longest file name most file systems accept, in bytes.
FILENAME_MAX_BYTES = 255

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class DownloadTarget:
    """A checked download request: fetch `url` into `models/<mode>/<filename>`."""

    #: The URL as the client gave it, credentials included: the download's key.  Never shown:
    #: answers, errors and logs use `shown_url`.
    url: str
    filename: str
    mode: Mode
    #: Lower-case hex digest the file must have, when the request gave one.
    sha256: str | None

    @classmethod
    def check(cls, url: str, filename: str | None, mode: str, sha256: str | None = None) -> DownloadTarget:
        """Check every field of a download request; take the filename from the URL when omitted.

        Raises `InvalidRequest` with a detail naming the bad field (`url`, `filename`,
        `sha256`), or `InvalidMode` for a mode that is not llm, embed or rerank.
        """
        check_url(url)
        if not is_mode(mode):
            raise InvalidMode(mode)
        if filename is None:
            filename = filename_from_url(url)
        else:
            check_filename(filename)
        return cls(url, filename, mode, check_sha256(sha256))

    @property
    def model_name(self) -> str:
        return model_name_of(self.filename)

    @property
    def shown_url(self) -> str:
        """The URL with its credentials replaced by `***` (`https://***@host/path`)."""
        return redact_url(self.url)

    @property
    def request_url(self) -> httpx.URL:
        """The URL to send: without its user-info, so no request line or log carries the password."""
        return httpx.URL(self.url).copy_with(userinfo=b"")

    @property
    def authorization(self) -> str | None:
        """The `Authorization` header (HTTP Basic) made of the URL's user-info, or None when it has none."""
        parsed = httpx.URL(self.url)
        if not parsed.username and not parsed.password:
            return None
        credentials = f"{parsed.username}:{parsed.password}".encode()
        return "Basic " + base64.b64encode(credentials).decode("ascii")


def check_url(url: str) -> None:
    """Raise `InvalidRequest` unless `url` is an absolute http or https URL with a host.

    The detail never repeats credentials given in the URL.
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequest("url: must not be empty", param="url")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        # httpx may quote a piece of the authority ("Invalid port: 'pa'" for user:pa/ss@host),
        # which can be a piece of a password
        why = "" if "@" in url else f": {exc}"
        raise InvalidRequest(f"url: not a valid URL{why}", param="url") from exc
    shown = redact_url(url)
    if parsed.scheme not in ("http", "https"):
        scheme = f"{parsed.scheme!r}" if parsed.scheme else "none"
        raise InvalidRequest(f"url: must be an http or https URL (scheme {scheme} in {shown!r})", param="url")
    if not parsed.host:
        raise InvalidRequest(f"url: has no host: {shown!r}", param="url")


def check_filename(filename: str) -> None:
    """Raise `InvalidRequest` unless `filename` is a plain `*.gguf` name to create in a mode's folder.

    Refused: empty, a path separator, `..`, a leading dot, a NUL or other control
    character, longer than 255 bytes, or not ending in `.gguf`.
    """
    if not filename:
        raise InvalidRequest("filename: must not be empty", param="filename")
    if "/" in filename or "\\" in filename:
        raise InvalidRequest(f"filename: must not contain a path separator: {filename!r}", param="filename")
    if ".." in filename:
        raise InvalidRequest(f"filename: must not contain '..': {filename!r}", param="filename")
    if filename.startswith("."):
        raise InvalidRequest(f"filename: must not start with a dot: {filename!r}", param="filename")
    if "\x00" in filename:
        raise InvalidRequest("filename: must not contain a NUL byte", param="filename")
    if _CONTROL.search(filename):
        raise InvalidRequest(f"filename: must not contain control characters: {filename!r}", param="filename")
    if not filename.lower().endswith(GGUF_SUFFIX):
        raise InvalidRequest(f"filename: must end in {GGUF_SUFFIX}: {filename!r}", param="filename")
    if len(filename.encode("utf-8", "surrogatepass")) > FILENAME_MAX_BYTES:
        raise InvalidRequest(f"filename: longer than {FILENAME_MAX_BYTES} bytes", param="filename")


def path_in_folder(folder: Path, filename: str) -> Path:
    """`folder / filename`, once more checked to be a direct child of `folder`.

    `check_filename` already refuses every name that could leave the folder; this is
    the last guard before a path is written.  Raises `InvalidRequest` (field `filename`).
    """
    check_filename(filename)
    path = folder / filename
    if path.parent != folder or path.name != filename:
        raise InvalidRequest(f"filename: {filename!r} is not a plain name inside {folder}", param="filename")
    return path


def filename_from_url(url: str) -> str:
    """The last segment of the URL's path, percent-decoded, checked like a given filename.

    Raises `InvalidRequest` (field `filename`) when that segment is not a valid name.
    """
    segment = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    try:
        check_filename(segment)
    except InvalidRequest as exc:
        why = exc.detail.removeprefix("filename: ")
        raise InvalidRequest(
            f"filename: not given, and the URL's last path segment is no valid name ({why})", param="filename"
        ) from None
    return segment


def check_sha256(sha256: str | None) -> str | None:
    """The digest in lower case, or None; raises `InvalidRequest` unless it is 64 hex digits."""
    if sha256 is None:
        return None
    if not _SHA256.match(sha256):
        raise InvalidRequest("sha256: must be 64 hexadecimal digits", param="sha256")
    return sha256.lower()


def model_name_of(filename: str) -> str:
    """The model name a downloaded file is registered under: its name without `.gguf`."""
    return filename[: -len(GGUF_SUFFIX)] if filename.lower().endswith(GGUF_SUFFIX) else filename

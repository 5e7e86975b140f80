"""What to download and where to: a request checked before anything is written.

Trio-free: these functions only look at strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import httpx

from ..errors import InvalidMode, InvalidRequest
from ..settings import MODES

__all__ = ["DownloadTarget", "check_filename", "check_sha256", "check_url", "filename_from_url", "model_name_of"]

GGUF_SUFFIX = ".gguf"
#: Longest file name most file systems accept, in bytes.
FILENAME_MAX_BYTES = 255

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class DownloadTarget:
    """A checked download request: fetch `url` into `models/<mode>/<filename>`."""

    url: str
    filename: str
    mode: str
    #: Lower-case hex digest the file must have, when the request gave one.
    sha256: str | None

    @classmethod
    def check(cls, url: str, filename: str | None, mode: str, sha256: str | None = None) -> DownloadTarget:
        """Check every field of a download request; take the filename from the URL when omitted.

        Raises `InvalidRequest` with a detail naming the bad field (`url`, `filename`,
        `sha256`), or `InvalidMode` for a mode that is not llm, embed or rerank.
        """
        check_url(url)
        if mode not in MODES:
            raise InvalidMode(mode)
        if filename is None:
            filename = filename_from_url(url)
        else:
            check_filename(filename)
        return cls(url, filename, mode, check_sha256(sha256))

    @property
    def model_name(self) -> str:
        return model_name_of(self.filename)


def check_url(url: str) -> None:
    """Raise `InvalidRequest` unless `url` is an absolute http or https URL with a host."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequest("url: must not be empty")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise InvalidRequest(f"url: not a valid URL: {exc}") from exc
    if parsed.scheme not in ("http", "https"):
        shown = f"{parsed.scheme!r}" if parsed.scheme else "none"
        raise InvalidRequest(f"url: must be an http or https URL (scheme {shown} in {url!r})")
    if not parsed.host:
        raise InvalidRequest(f"url: has no host: {url!r}")


def check_filename(filename: str) -> None:
    """Raise `InvalidRequest` unless `filename` is a plain `*.gguf` name to create in a mode's folder.

    Refused: empty, a path separator, `..`, a leading dot, a NUL or other control
    character, longer than 255 bytes, or not ending in `.gguf`.
    """
    if not filename:
        raise InvalidRequest("filename: must not be empty")
    if "/" in filename or "\\" in filename:
        raise InvalidRequest(f"filename: must not contain a path separator: {filename!r}")
    if ".." in filename:
        raise InvalidRequest(f"filename: must not contain '..': {filename!r}")
    if filename.startswith("."):
        raise InvalidRequest(f"filename: must not start with a dot: {filename!r}")
    if "\x00" in filename:
        raise InvalidRequest("filename: must not contain a NUL byte")
    if _CONTROL.search(filename):
        raise InvalidRequest(f"filename: must not contain control characters: {filename!r}")
    if not filename.lower().endswith(GGUF_SUFFIX):
        raise InvalidRequest(f"filename: must end in {GGUF_SUFFIX}: {filename!r}")
    if len(filename.encode("utf-8", "surrogatepass")) > FILENAME_MAX_BYTES:
        raise InvalidRequest(f"filename: longer than {FILENAME_MAX_BYTES} bytes")


def filename_from_url(url: str) -> str:
    """The last segment of the URL's path, percent-decoded, checked like a given filename.

    Raises `InvalidRequest` (field `filename`) when that segment is not a valid name.
    """
    segment = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    try:
        check_filename(segment)
    except InvalidRequest as exc:
        raise InvalidRequest(
            f"filename: not given, and the URL's last path segment is no valid name ({exc.detail.removeprefix('filename: ')})"
        ) from None
    return segment


def check_sha256(sha256: str | None) -> str | None:
    """The digest in lower case, or None; raises `InvalidRequest` unless it is 64 hex digits."""
    if sha256 is None:
        return None
    if not _SHA256.match(sha256):
        raise InvalidRequest("sha256: must be 64 hexadecimal digits")
    return sha256.lower()


def model_name_of(filename: str) -> str:
    """The model name a downloaded file is registered under: its name without `.gguf`."""
    return filename[: -len(GGUF_SUFFIX)] if filename.lower().endswith(GGUF_SUFFIX) else filename

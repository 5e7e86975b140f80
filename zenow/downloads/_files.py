"""The files of a download: the `.part` being written, the checks on it, and the rename into place.

Trio-free and blocking: the download actor calls each of these through `trio.to_thread`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..servers import GGUF_MAGIC, has_gguf_magic

__all__ = [
    "GGUF_MAGIC",
    "ExistingFile",
    "PartDigest",
    "PartFile",
    "existing_file",
    "file_size",
    "free_bytes",
    "has_gguf_magic",
    "is_gguf_prefix",
    "part_path_of",
    "promote",
    "remove_file",
    "sha256_of",
]

_HASH_BLOCK = 1 << 20
#: The most bytes one `write` call hands the kernel.  Measured (bench/RESULTS.md, branch `dl`): 1 MiB
#: writes cost the kernel 0.22-0.24 s of CPU per GiB in some downloads and 0.8-1.8 s in others (always
#: after another file of that size was written with small writes and deleted: page cache folios as
#: large as the write, presumably, that fragmented memory must first make room for); 64 and 128 KiB
#: writes cost 0.25-0.29 s per GiB every time.
_WRITE_PIECE = 128 << 10


def part_path_of(final: Path) -> Path:
    """Where the file is written until it is complete: `<final>.part` next to it."""
    return final.with_name(final.name + ".part")


def file_size(path: Path) -> int:
    """Size of a regular file in bytes, 0 when there is none."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except FileNotFoundError:
        return 0


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of the file's content (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def is_gguf_prefix(path: Path) -> bool:
    """Whether the file's bytes can begin a GGUF file: it starts with the magic, or is a
    shorter piece of it.  False when it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError:
        return False
    return GGUF_MAGIC.startswith(head)


def free_bytes(directory: Path) -> int:
    """Bytes free for an unprivileged user on the file system holding `directory` (`statvfs`).

    Creates `directory` first when it is missing.  Raises `OSError`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def remove_file(path: Path) -> bool:
    """Delete the file at `path`; return whether there was one.  Raises `OSError` (not for a missing file)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def promote(part: Path, final: Path) -> None:
    """Rename the complete `.part` to its final name once its bytes are on the disk; make the rename durable."""
    with open(part, "rb") as f:
        os.fsync(f.fileno())  # a no-op when the writer synced it; needed for a .part from an earlier run
    os.replace(part, final)
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartDigest:
    """The SHA-256 of a `.part`'s first `size` bytes, kept up to date as bytes are appended,
    so that a complete file need not be read again to be checked."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def restart_from(self, path: Path, size: int) -> None:
        """Hash the file's first `size` bytes afresh (a resume of a `.part` this digest has not seen)."""
        self._hash, self.size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while self.size < size and (block := f.read(min(_HASH_BLOCK, size - self.size))):
                self.update(block)
        if self.size != size:
            raise OSError(f"{path} is shorter than {size} bytes")


class PartFile:
    """A `.part` file open for writing from `offset` on; what lies beyond `offset` is cut off.

    With a `digest`, every byte written goes into it; a digest that does not cover exactly
    the first `offset` bytes is first brought up to them from the file.  Raises `OSError`
    from every method (ENOSPC when the disk is full).
    """

    def __init__(self, path: Path, offset: int, digest: PartDigest | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # unbuffered: the caller hands over large pieces, written as they are
        self._file = open(path, "r+b" if path.exists() else "w+b", buffering=0)  # noqa: SIM115
        try:
            self._file.truncate(offset)
            self._file.seek(offset)
            if digest is not None and digest.size != offset:
                digest.restart_from(path, offset)
        except BaseException:
            self._file.close()
            raise
        self._digest = digest
        #: The file's size: where the next write goes.
        self.position = offset

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append `data` (a short write is continued, never dropped), `_WRITE_PIECE` bytes a call."""
        view = memoryview(data)
        while view:
            written = self._file.write(view[:_WRITE_PIECE])
            self.position += written
            view = view[written:]
        if self._digest is not None:
            self._digest.update(data)

    def sync(self) -> None:
        """The bytes are on the disk when this returns."""
        os.fsync(self._file.fileno())

    def write_back(self, start: int, end: int) -> None:
        """Start putting the bytes from `start` to `end` on the disk, without waiting for it, and let
        the page cache forget them once they are there (`posix_fadvise` DONTNEED): the cache never
        holds the whole file dirty, and the last `sync` has little left to do."""
        os.posix_fadvise(self._file.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True, slots=True)
class ExistingFile:
    """A file found where a download would put its result."""

    path: Path
    size: int
    #: Modification time: tells a file that changed since it was looked at from the same one.
    mtime_ns: int
    is_gguf: bool


def existing_file(path: Path) -> ExistingFile | None:
    """What is at `path`: None when nothing is; raises `OSError` when it cannot be read.

    Anything there that is not a regular file (a folder, say) counts as a file that
    is not GGUF: it holds the name all the same.
    """
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return ExistingFile(path, stat.st_size, stat.st_mtime_ns, path.is_file() and has_gguf_magic(path))

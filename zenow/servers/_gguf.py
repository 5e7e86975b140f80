"""Checking a model file before handing it to llama-server (trio-free)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidModelFile

GGUF_MAGIC = b"GGUF"


def check_model_file(path: Path) -> int:
    """Return the size of the GGUF file at `path`.

    Raises `InvalidModelFile` with a message a user can act on when there is no
    file there or it does not start with the GGUF magic bytes.
    """
    try:
        with path.open("rb") as f:
            magic = f.read(4)
            size = path.stat().st_size
    except FileNotFoundError:
        raise InvalidModelFile(f"Model file not found: {path}") from None
    except IsADirectoryError:
        raise InvalidModelFile(f"Model path is a directory, not a GGUF file: {path}") from None
    except OSError as exc:
        raise InvalidModelFile(f"Cannot read model file {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise InvalidModelFile(
            f"Not a GGUF model file: {path} (it starts with {magic!r}, expected {GGUF_MAGIC!r})"
        )
    return size

"""How far a download got, as the spec shows it.  Trio-free."""

from __future__ import annotations

from ..store import DownloadRecord

__all__ = ["progress_percent"]


def progress_percent(record: DownloadRecord) -> float:
    """Percent done, rounded to 0.01: 100.0 when completed, 0.0 while the size is unknown."""
    if record.status == "completed":
        return 100.0
    if not record.total:
        return 0.0
    return round(min(100.0, record.downloaded * 100.0 / record.total), 2)

"""Reading Server-Sent Events: the `data` of each event in a stream of lines.  Pure, trio-free."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["sse_data"]


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The data of each event in `lines` (a body split into lines, without their line ends).

    Comments (`: ping`) and the other fields (`event:`, `id:`, `retry:`) are skipped; the
    `data:` lines of one event are joined with newlines, as EventSource does.  An event
    still open when the lines end is dropped (it was cut off).
    """
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)

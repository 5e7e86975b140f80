"""How the client shows things: rich tables on a terminal, plain aligned text otherwise, JSON on request."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

__all__ = ["Output", "human_size", "human_time"]


def human_size(size: int | float | None) -> str:
    """`512 B`, `1.5 KiB`, `26.6 MiB`; `-` when unknown."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_time(seconds: float | None) -> str:
    """`42 s`, `3 min 5 s`, `1 h 2 min`; `-` when unknown."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


class Output:
    """Where a command writes: `stdout` (a terminal gets rich output), or JSON with `as_json`."""

    def __init__(self, *, as_json: bool = False, stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.as_json = as_json
        self.is_terminal = self.stdout.isatty() and not as_json
        self.console = Console(file=self.stdout, highlight=False, soft_wrap=True)
        self.err_console = Console(file=self.stderr, highlight=False, soft_wrap=True)

    def json(self, value: Any) -> None:
        """One JSON document on its own line."""
        self.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")
        self.stdout.flush()

    def line(self, text: str, *, style: str | None = None) -> None:
        """A line for the reader (styled on a terminal)."""
        if self.is_terminal:
            self.console.print(text, style=style, markup=False)
        else:
            self.stdout.write(text + "\n")
            self.stdout.flush()

    def note(self, text: str) -> None:
        """A line beside the results (stderr), so piped output stays clean."""
        if self.stderr.isatty():
            self.err_console.print(text, style="dim", markup=False)
        else:
            self.stderr.write(text + "\n")
            self.stderr.flush()

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        """A table: boxed on a terminal, else one line per row with columns aligned by spaces."""
        if self.is_terminal:
            table = Table(title=title, title_justify="left")
            for column in columns:
                table.add_column(column, overflow="fold")
            for row in rows:
                table.add_row(*row)
            self.console.print(table)
            return
        widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows, strict=True)]
        for row in (columns, *rows):
            cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
            self.stdout.write("  ".join(cells).rstrip() + "\n")
        self.stdout.flush()

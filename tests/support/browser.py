"""A real Chromium for the page's tests: Debian's /usr/bin/chromium driven by Playwright.

Playwright's sync API runs in one worker thread per test (`in_browser`), while zenow and
the other servers of the test keep running on the test's trio loop; code in the browser
thread reaches back into trio with `trio.from_thread`.  Every console error and uncaught
page error fails the test, unless it matches one of the patterns the test expects (a test
that stops zenow on purpose expects the browser to say the connection was refused).

Never `playwright install`: the machine has no internet.  `make test` installs Debian's
`chromium` package when /usr/bin/chromium is missing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from playwright.sync_api import ConsoleMessage, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: Where a test writes the README's screenshots when ZENOW_DOCS_SCREENSHOTS=1.
DOCS = Path(__file__).resolve().parents[2] / "docs"

T = TypeVar("T")


@dataclass
class Browser:
    """One browser context (one profile: its windows share localStorage) and what went wrong in it."""

    context: object
    base_url: str
    problems: list[str] = field(default_factory=list)
    expected: tuple[re.Pattern[str], ...] = ()

    def window(self, path: str = "/", width: int = 1280, height: int = 800) -> Page:
        """A new window showing `path` of zenow, watched for console and page errors."""
        page: Page = self.context.new_page()  # type: ignore[attr-defined]
        page.set_viewport_size({"width": width, "height": height})
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.goto(self.base_url + path)
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        text = f"console error: {message.text} ({message.location.get('url', '')})"
        if not any(pattern.search(text) for pattern in self.expected):
            self.problems.append(text)


@contextmanager
def browser(base_url: str, *, expected_errors: tuple[str, ...] = ()) -> Iterator[Browser]:
    """A fresh Chromium profile on zenow at `base_url`; fails the test on any unexpected
    console or page error seen while it was open."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no {CHROMIUM}: `make test` installs Debian's chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = chromium.new_context()
            context.set_default_timeout(30_000)
            session = Browser(context, base_url, expected=tuple(re.compile(p) for p in expected_errors))
            yield session
            context.close()
        finally:
            chromium.close()
    assert not session.problems, "the browser reported errors:\n" + "\n".join(session.problems)


async def in_browser(scenario: Callable[[], T]) -> T:
    """Run the sync `scenario` (which opens the browser) in a worker thread and return its result."""
    return await trio.to_thread.run_sync(scenario)


def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """Save the window to `tmp_path/name`, and to docs/ as well when ZENOW_DOCS_SCREENSHOTS=1."""
    path = tmp_path / name
    page.screenshot(path=str(path))
    if os.environ.get("ZENOW_DOCS_SCREENSHOTS") == "1":
        page.screenshot(path=str(DOCS / name))
    return path


def wait_until(page: Page, script: str, arg: object = None, timeout: float = 30_000) -> object:
    """Wait until the JavaScript function `script` (given `arg`) returns something truthy; return it."""
    try:
        return page.wait_for_function(script, arg=arg, timeout=timeout).json_value()
    except PlaywrightError as exc:
        raise AssertionError(f"timed out waiting in the browser for {script}") from exc

"""Credentials out of everything a download shows: answers, errors and log lines.  Trio-free.

A download URL may carry `user:password@` (or a bare token as the user).  Zenow
keeps the URL as given where it must (the record's key, so a resume after a restart
can still log in), and shows it as `https://***@host/path` everywhere else.
"""

from __future__ import annotations

import re

__all__ = ["REDACTED", "redact_text", "redact_url"]

#: What replaces the user-info part of a URL.
REDACTED = "***"

# scheme://userinfo@ — the authority ends at the first "/", "?" or "#"; the user-info
# is everything in it up to its last "@" (a password typed with a raw "@" included)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s]*@")


def redact_url(url: str) -> str:
    """`url` with its user-info (`user:password@`, `token@`) replaced by `***@`; unchanged without one."""
    return redact_text(url)


def redact_text(text: str) -> str:
    """`text` with the user-info of every URL in it replaced by `***@` (for error texts and logs)."""
    return _USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)

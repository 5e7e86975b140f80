"""The API keys of zenow's llama-server children.

Each child gets a random key of its own (`--api-key` through the environment variable
`LLAMA_API_KEY`, never on its command line, so `ps` does not show it): another user of
the machine who finds the child's port on 127.0.0.1 cannot use it.  The key travels with
the child's running status (`ServerStatus.authorization`): every request to a child
sends the headers of the status it was made with (`ServerStatus.auth_headers()`).
"""

from __future__ import annotations

import secrets

__all__ = ["new_key"]


def new_key() -> str:
    """A fresh key for a child about to start."""
    return secrets.token_urlsafe(32)

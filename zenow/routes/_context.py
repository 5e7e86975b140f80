"""What routes reach: the actor handles, through the current app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quart import current_app

if TYPE_CHECKING:
    from ..chat import ChatStreamer
    from ..downloads import Downloads
    from ..servers import ServerHandle
    from ..settings import Settings
    from ..store import Store
    from ..tokens import TokenCounter


@dataclass(frozen=True)
class Services:
    """The handles a route may use; built by the service, attached to the app."""

    settings: Settings
    store: Store
    tokens: TokenCounter
    servers: dict[str, ServerHandle]  # one per mode
    downloads: Downloads
    chat: ChatStreamer


def services() -> Services:
    return current_app.config["ZENOW_SERVICES"]  # type: ignore[no-any-return]

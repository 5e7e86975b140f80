"""`Services`: the actor handles the HTTP front may use, built by the service at start."""

from __future__ import annotations

from dataclasses import dataclass

from .actor import ActorHealth
from .chat import ChatStreamer
from .downloads import Downloads
from .events import EventHub
from .servers import ServerHandle
from .settings import Mode, Settings
from .store import Store
from .tokens import TokenCounter
from .v1 import OpenAIGateway

__all__ = ["Services"]


@dataclass(frozen=True)
class Services:
    """The handles a route may use; built by the service, attached to the app."""

    settings: Settings
    store: Store
    tokens: TokenCounter
    servers: dict[Mode, ServerHandle]  # one per mode
    downloads: Downloads
    chat: ChatStreamer
    #: `/v1`: OpenAI-compatible chat, embeddings, rerank and models.
    openai: OpenAIGateway
    #: Which actors have given up (the health probe reports them).
    health: ActorHealth
    #: Where actors publish events; `/api/events` and `/api/ws` subscribe to it.
    events: EventHub

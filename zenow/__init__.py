"""Zenow: a local LLM backend serving one HTTP API over local GGUF models.

The public pieces: `Settings` (configuration) and `serve` (run the service until
cancelled).  Everything else is reached through the HTTP API.
"""

__version__ = "0.1.0"

from .settings import Settings as Settings

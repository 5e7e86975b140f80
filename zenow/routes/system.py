"""Discovery: the health probe the original desktop front end uses to find its backend."""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from .. import __version__
from ._context import services

bp = Blueprint("system", __name__)


@bp.get("/api/health")
async def health() -> tuple[dict[str, Any], int]:
    """200 `healthy` while every actor serves; 503 `degraded` naming the actors that gave up."""
    down = services().health.down()
    if down:
        return {"status": "degraded", "app": "zenow", "version": __version__, "down": down}, 503
    return {"status": "healthy", "app": "zenow", "version": __version__}, 200

"""Discovery: the health probe the original desktop front end uses to find its backend."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, g

from .. import __version__
from ._context import services
from ._shapes import Health, documented

bp = Blueprint("system", __name__)


@bp.get("/api/health")
@documented(Health)
async def health() -> tuple[dict[str, Any], int]:
    """200 `healthy` while every actor serves; 503 `degraded` naming the actors that gave up."""
    down = services().health.down()
    if not g.get("zenow_authenticated", True):  # keys are set and none was given: say only that zenow is up
        return {"status": "degraded" if down else "healthy", "app": "zenow"}, 503 if down else 200
    if down:
        return {"status": "degraded", "app": "zenow", "version": __version__, "down": down}, 503
    return {"status": "healthy", "app": "zenow", "version": __version__}, 200

"""Discovery: the health probe the original desktop front end uses to find its backend."""

from __future__ import annotations

from quart import Blueprint

from .. import __version__

bp = Blueprint("system", __name__)


@bp.get("/api/health")
async def health() -> dict[str, object]:
    return {"status": "healthy", "app": "zenow", "version": __version__}

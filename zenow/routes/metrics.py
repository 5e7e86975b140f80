"""`GET /metrics`: Prometheus text (see `zenow.metrics`), and the count of every request answered.

It needs the API key like every route when keys are configured (the app checks it first).
"""

from __future__ import annotations

import time

from quart import Blueprint, Response, g, request
from quart_schema import hide

from .. import metrics
from ._context import services

bp = Blueprint("metrics", __name__)


@bp.before_app_request
async def note_arrival() -> None:
    g.zenow_arrived = time.perf_counter()


#: The methods counted by name; any other is counted as "other".
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@bp.after_app_request
async def count_answer(response: Response) -> Response:
    req = request._get_current_object()  # type: ignore[attr-defined]  # one look-up, not four
    # The route's pattern, never the path: ids and bad URLs must not grow the series without bound.
    route = req.url_rule.rule if req.url_rule is not None else "unmatched"
    arrived = g.get("zenow_arrived")
    method = req.method if req.method in _METHODS else "other"  # any token is a method to HTTP
    metrics.request_answered(method, route, response.status_code,
                             None if arrived is None else time.perf_counter() - arrived)
    return response


@bp.get("/metrics")
@hide  # Prometheus text, not JSON: scrapers know the format, /openapi.json documents the JSON API
async def scrape() -> Response:
    """zenow's figures, then each running llama-server's own (fetched now, labelled with `mode`)."""
    zenow = services()
    body = await metrics.scrape(
        {mode: server.server_metrics for mode, server in zenow.servers.items()},
        {mode: server.status().status for mode, server in zenow.servers.items()},
        zenow.chat.open_streams,
    )
    return Response(body, status=200, content_type=metrics.CONTENT_TYPE)

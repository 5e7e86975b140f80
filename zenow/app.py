"""The HTTP front: builds the quart-trio app, maps errors to `{"detail": ...}`, and does CORS."""

from __future__ import annotations

import logging
import re
from typing import Any

from quart import Response, jsonify, request
from quart_schema import QuartSchema, RequestSchemaValidationError
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug.exceptions import BadRequest, HTTPException

from . import __version__
from .errors import ZenowError, single_cause
from .routes import blueprints
from .routes._context import Services
from .routes._validation import describe_validation_error

__all__ = ["create_app", "origin_allowed"]

log = logging.getLogger(__name__)

_LOCAL_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\]|tauri\.localhost)(:\d{1,5})?$")
_APP_SCHEMES = ("app://", "tauri://")


def origin_allowed(origin: str, extra: tuple[str, ...] = ()) -> bool:
    """Whether a browser page from `origin` may call zenow.

    Allowed: local development servers and desktop shells (`http(s)://localhost:*`,
    `127.0.0.1:*`, `[::1]:*`, `app://`, `tauri://`), `null` (a `file://` page), and the
    exact origins in `extra`.
    """
    return (
        origin == "null"
        or bool(_LOCAL_ORIGIN.match(origin))
        or origin.startswith(_APP_SCHEMES)
        or origin in extra
    )


class _JSONRequest(TrioRequest):
    """Reads a JSON body whatever its Content-Type, and fails with a clear detail."""

    async def get_json(self, force: bool = True, silent: bool = False, cache: bool = True) -> Any:
        return await super().get_json(force=True, silent=silent, cache=cache)

    def on_json_loading_failed(self, error: Exception) -> Any:
        raise BadRequest(f"Request body is not valid JSON: {error}")


def _detail(status: int, detail: str, **extra: Any) -> Response:
    response = jsonify({"detail": detail, **extra})
    response.status_code = status
    return response


def create_app(services: Services) -> QuartTrio:
    """The quart-trio app serving the whole API over `services`."""
    app = QuartTrio("zenow")
    app.request_class = _JSONRequest
    app.config["ZENOW_SERVICES"] = services
    QuartSchema(
        app,
        info={"title": "Zenow", "version": __version__},
        swagger_ui_path=None, redoc_ui_path=None, scalar_ui_path=None,  # no CDN assets offline
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the spec's field order
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    for blueprint in blueprints:
        app.register_blueprint(blueprint)

    extra_origins = services.settings.cors_origins

    @app.before_request
    async def cors_preflight() -> Response | None:
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" or origin is None or "Access-Control-Request-Method" not in request.headers:
            return None
        if not origin_allowed(origin, extra_origins):
            return _detail(403, f"Origin {origin} is not allowed")
        response = Response("", status=204)
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = request.headers.get(
            "Access-Control-Request-Headers", "Content-Type"
        )
        response.headers["Access-Control-Max-Age"] = "600"
        response.headers["Vary"] = "Origin"
        return response

    @app.after_request
    async def cors_headers(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is not None and origin_allowed(origin, extra_origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            if "Origin" not in response.headers.get("Vary", ""):
                response.headers.add("Vary", "Origin")
        return response

    @app.errorhandler(RequestSchemaValidationError)
    async def invalid_request(error: RequestSchemaValidationError) -> Response:
        return _detail(400, describe_validation_error(error.validation_error))

    @app.errorhandler(ZenowError)
    async def zenow_error(error: ZenowError) -> Response:
        if error.status_code >= 500:
            log.error("%s %s failed: %s", request.method, request.path, error, exc_info=error)
        return _detail(error.status_code, error.detail)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        return _detail(error.code or 500, error.description or error.name)

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        inner = single_cause(error)
        if inner is not error:
            return await app.handle_user_exception(inner)  # type: ignore[return-value]
        log.error("%s %s failed unexpectedly", request.method, request.path, exc_info=error)
        return _detail(500, f"Internal error: {type(error).__name__}: {error}")

    return app

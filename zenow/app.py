"""The HTTP front: builds the quart-trio app, maps errors to `{"detail": ...}`, and does CORS."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
from collections.abc import Mapping
from typing import Any, cast

from quart import Request, Response, g, jsonify, request
from quart.typing import ResponseReturnValue
from quart_schema import QuartSchema, RequestSchemaValidationError
from quart_schema.openapi import OpenAPIProvider
from quart_schema.validation import DataSource
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from . import __version__
from .errors import ZenowError, single_cause
from .handles import Services
from .request_body import JSONRequest
from .routes import blueprints
from .routes._validation import describe_validation_error, first_bad_field
from .routes.page import is_public_page_path
from .routes.sessions import ID_MAX

__all__ = ["create_app", "origin_allowed"]

log = logging.getLogger(__name__)

_LOCAL_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\]|tauri\.localhost)(:\d{1,5})?$")
_APP_SCHEMES = ("app://", "tauri://")


def origin_allowed(origin: str, extra: tuple[str, ...] = ()) -> bool:
    """Whether a browser page from `origin` may call zenow.

    Allowed: local development servers (`http(s)://localhost:*`, `127.0.0.1:*`,
    `[::1]:*`), desktop shells whose pages no web site can serve (`app://…`,
    `tauri://…`, `http(s)://tauri.localhost`), and the exact origins in `extra`.
    `null` is not allowed unless listed in `extra`: it is what a `file://` page sends
    (a packaged Electron front end), but also what any sandboxed iframe of any web
    site sends, so it is opt-in.
    """
    return bool(_LOCAL_ORIGIN.match(origin)) or origin.startswith(_APP_SCHEMES) or origin in extra


_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})


def host_allowed(host_header: str, allowed: frozenset[str]) -> bool:
    """Whether a `Host` header names this machine (any port) or an allowed name.

    Against DNS rebinding: a web site whose name resolves to 127.0.0.1 still sends its
    own name as `Host`, so it is refused.
    """
    host = host_header.strip().lower()
    if host.startswith("["):
        name = host[: host.find("]") + 1] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name in _LOOPBACK_HOSTS or name in allowed


def is_loopback(address: str) -> bool:
    """Whether zenow listening on `address` is reachable from this machine only."""
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return address == "localhost"


#: Routes a browser opens without being able to set headers (EventSource, WebSocket): the key
#: may come as `?api_key=` there, and nowhere else (a URL ends up in logs and histories).
KEY_IN_QUERY_PATHS = frozenset({"/api/events", "/api/ws"})


def presented_key(headers: Headers | Mapping[str, str], path: str, args: Mapping[str, str]) -> str | None:
    """The API key a request carries: `Authorization: Bearer KEY`, `x-api-key: KEY`, or
    `?api_key=KEY` on the routes in `KEY_IN_QUERY_PATHS`."""
    authorization = headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if headers.get("x-api-key"):
        return headers["x-api-key"].strip()
    if path in KEY_IN_QUERY_PATHS and args.get("api_key"):
        return args["api_key"]
    return None


def key_accepted(presented: str | None, keys: tuple[str, ...]) -> bool:
    """Whether `presented` is one of `keys`, compared in constant time against every key."""
    if presented is None:
        return False
    given = presented.encode("utf-8", "surrogateescape")
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode("utf-8", "surrogateescape"))
    return matched


_JSON_TYPES = re.compile(r"^application/([\w.+-]+\+)?json$")


#: OpenAI's error `type` for each status zenow answers on `/v1`.
_OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                       404: "not_found_error", 409: "conflict_error", 413: "invalid_request_error",
                       415: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error"}


def _detail(status: int, detail: str, *, param: str | None = None, code: str | None = None,
            **extra: Any) -> Response:
    """An error answer: `{"detail": ...}` on `/api`, OpenAI's `{"error": {...}}` on `/v1`."""
    # A detail may quote the client's own bad text; never fail to say so.
    detail = detail.encode("utf-8", "backslashreplace").decode("utf-8")
    if request.path.startswith("/v1/") or request.path == "/v1":
        kind = _OPENAI_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        response = jsonify({"error": {"message": detail, "type": kind, "param": param, "code": code}})
    else:
        response = jsonify({"detail": detail, **extra})
    response.status_code = status
    return response


class _OpenAPI(OpenAPIProvider):
    """Marks every documented request body as required (zenow answers 415 to a write without one)
    and required query parameters as required, and documents `*_id` path segments as the
    integers the routes read them as."""

    def build_path_parameter(self, name: str, converter: Any) -> dict[str, Any]:
        parameter = super().build_path_parameter(name, converter)
        if name.endswith("_id"):  # ids are parsed by the route (400 naming the field when not an integer)
            parameter["schema"] = {"type": "integer", "minimum": -ID_MAX, "maximum": ID_MAX}
        return parameter

    def build_querystring_parameters(self, model: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        # quart-schema looks for `required` on each property; JSON Schema lists it on the object.
        parameters, definitions = super().build_querystring_parameters(model)
        required = set(model.model_json_schema().get("required", ()))
        return [{**p, "required": True} if p["name"] in required else p for p in parameters], definitions

    def build_request_body(self, model: Any, source: DataSource) -> tuple[dict[str, Any], dict[str, Any]]:
        body, components = super().build_request_body(model, source)
        return {**body, "required": True}, components


def _is_preflight(req: Request) -> bool:
    return req.method == "OPTIONS" and "Origin" in req.headers and "Access-Control-Request-Method" in req.headers


def create_app(services: Services) -> QuartTrio:
    """The quart-trio app serving the whole API over `services`."""
    app = QuartTrio("zenow")
    app.request_class = JSONRequest
    app.config["ZENOW_SERVICES"] = services
    QuartSchema(
        app,
        info={"title": "Zenow", "version": __version__},
        swagger_ui_path=None, redoc_ui_path=None, scalar_ui_path=None,  # no CDN assets offline
        openapi_provider_class=_OpenAPI,
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the spec's field order
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    for blueprint in blueprints:
        app.register_blueprint(blueprint)

    settings = services.settings
    extra_origins = settings.cors_origins
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_size
    app.config["BODY_TIMEOUT"] = settings.read_timeout
    check_host = is_loopback(settings.host)
    allowed_hosts = frozenset(h.lower() for h in settings.allowed_hosts)

    api_keys = settings.api_keys

    def refuse_foreign_host(req: Request) -> Response | None:
        if check_host and not host_allowed(req.headers.get("Host", ""), allowed_hosts):
            return _detail(403, f"Host {req.headers.get('Host', '')!r} is not allowed: zenow answers "
                                "localhost, 127.0.0.1 and [::1] (add names with --allowed-host)")
        return None

    def require_api_key(req: Request) -> Response | None:
        if not api_keys or _is_preflight(req):
            return None
        authenticated = key_accepted(presented_key(req.headers, req.path, req.args), api_keys)
        g.zenow_authenticated = authenticated
        # The page and its assets hold no data; the page asks for the key before it calls /api.
        if authenticated or (req.method == "GET" and (req.path == "/api/health" or is_public_page_path(req.path))):
            return None
        response = _detail(401, "Missing or wrong API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
                           code="invalid_api_key")
        response.headers["WWW-Authenticate"] = 'Bearer realm="zenow"'
        return response

    def require_json_body(req: Request) -> Response | None:
        # A browser sends a cross-site POST with a text/plain or form body without asking
        # first (no preflight); requiring application/json makes every write preflighted.
        if req.method in ("POST", "PUT", "PATCH") and not _JSON_TYPES.match(req.mimetype or ""):
            return _detail(415, f"Content-Type must be application/json, got {req.mimetype or 'none'!r}")
        return None

    def cors_preflight(req: Request) -> Response | None:
        if not _is_preflight(req):
            return None
        origin = req.headers["Origin"]
        if not origin_allowed(origin, extra_origins):
            return _detail(403, f"Origin {origin} is not allowed")
        response = Response("", status=204)
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = req.headers.get(
            "Access-Control-Request-Headers", "Content-Type"
        )
        response.headers["Access-Control-Max-Age"] = "600"
        response.headers["Vary"] = "Origin"
        return response

    @app.before_request
    async def guard() -> Response | None:
        """The checks every request passes, in this order; the first refusal is the answer.

        One hook rather than four: Quart's cost per hook (and per look-up of `request`) was
        more than the checks themselves, on every request.
        """
        req = cast(Request, request._get_current_object())  # type: ignore[attr-defined]
        return refuse_foreign_host(req) or require_api_key(req) or require_json_body(req) or cors_preflight(req)

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
        return _detail(400, describe_validation_error(error.validation_error),
                       param=first_bad_field(error.validation_error))

    @app.errorhandler(ZenowError)
    async def zenow_error(error: ZenowError) -> Response:
        if error.status_code == 500:  # zenow's own failure: the traceback helps
            log.error("%s %s failed: %s", request.method, request.path, error, exc_info=error)
        elif error.status_code > 500:  # upstream, availability or storage: the reason says it all
            log.warning("%s %s: %s %s", request.method, request.path, error.status_code, error)
        return _detail(error.status_code, error.detail, param=error.param, code=error.code)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        return _detail(error.code or 500, error.description or error.name)

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> ResponseReturnValue:
        inner = single_cause(error)
        if inner is not error and isinstance(inner, Exception):
            return await app.make_response(await app.handle_user_exception(inner))
        log.error("%s %s failed unexpectedly", request.method, request.path, exc_info=error)
        return _detail(500, f"Internal error: {type(error).__name__}: {error}")

    return app

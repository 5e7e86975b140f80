"""What routes reach: the actor handles, through the current app; and JSON answers made cheaply."""

from __future__ import annotations

from typing import Any, cast

from quart import Response, current_app

from ..handles import Services


def services() -> Services:
    return cast(Services, current_app.config["ZENOW_SERVICES"])


def json_answer(payload: dict[str, Any]) -> Response:
    """`payload` (plain JSON values only) as the JSON answer Quart makes of a returned dict.

    Returned as a response, it skips quart-schema's conversion of return values, which builds
    a pydantic `TypeAdapter` and copies every value of every answer: on a page of sessions,
    more than the query and the encoding together.
    """
    return json_bytes_answer(json_body(payload))


def json_body(payload: dict[str, Any]) -> bytes:
    """The bytes `json_answer(payload)` answers (compact, the spec's field order, UTF-8, a final newline)."""
    return f"{current_app.json.dumps(payload, separators=(',', ':'))}\n".encode()


def json_bytes_answer(body: bytes) -> Response:
    """A 200 answer of `body`, JSON made by `json_body`."""
    return current_app.response_class(body, mimetype=current_app.json.mimetype)  # type: ignore[attr-defined]

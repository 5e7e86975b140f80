"""What routes reach: the actor handles, through the current app."""

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
    return cast(Response, current_app.json.response(payload))

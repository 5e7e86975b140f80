"""What routes reach: the actor handles, through the current app."""

from __future__ import annotations

from typing import cast

from quart import current_app

from ..handles import Services


def services() -> Services:
    return cast(Services, current_app.config["ZENOW_SERVICES"])

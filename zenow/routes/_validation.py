"""Turning pydantic's validation errors into one `detail` line."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(error: Exception) -> str:
    """One line naming each bad field, e.g. `role: Input should be 'user', 'assistant' or 'system'`."""
    if not isinstance(error, ValidationError):
        return str(error)
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        message = item["msg"]
        if item["type"] == "model_type" or item["type"] == "dict_type":
            message = "must be a JSON object"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def first_bad_field(error: Exception) -> str | None:
    """The dotted name of the first field a pydantic validation error names, if any."""
    if isinstance(error, ValidationError) and error.errors():
        return ".".join(str(p) for p in error.errors()[0]["loc"]) or None
    return None

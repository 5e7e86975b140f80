"""Turning pydantic's validation errors into one `detail` line (see `zenow.validation`)."""

from __future__ import annotations

from pydantic import ValidationError

from ..validation import field_problems


def describe_validation_error(error: Exception) -> str:
    """One line naming each bad field, e.g. `role: Input should be 'user', 'assistant' or 'system'`."""
    if not isinstance(error, ValidationError):
        return str(error)
    problems = field_problems(error)
    return "; ".join(f"{where or 'body'}: {' or '.join(messages)}" for where, messages in problems.items())


def first_bad_field(error: Exception) -> str | None:
    """The dotted name of the first field a pydantic validation error names, if any."""
    if isinstance(error, ValidationError):
        return next(iter(field_problems(error)), None) or None
    return None

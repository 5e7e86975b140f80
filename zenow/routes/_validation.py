"""Validating query strings, and turning pydantic's validation errors into one `detail` line (see
`zenow.validation`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from quart import request
from quart_schema.validation import QUART_SCHEMA_QUERYSTRING_ATTRIBUTE, QuerystringValidationError

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


M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")


def validate_querystring(
    model: type[M],
) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    """quart-schema's `validate_querystring` for a pydantic model: the route gets `query_args`,
    a bad value raises the same `QuerystringValidationError` (a 400 naming the field), and
    `/openapi.json` documents the same parameters; but the model's own validator is used, where
    quart-schema builds a new `TypeAdapter` on every request.  (No camelCase conversion: zenow's
    query parameters are snake_case.)
    """

    def decorate(route: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        setattr(route, QUART_SCHEMA_QUERYSTRING_ATTRIBUTE, model)

        @wraps(route)
        async def validated(*args: Any, **kwargs: Any) -> R:
            given = request.args
            values = {key.removesuffix("[]"): (given.getlist(key) if key.endswith("[]") or len(given.getlist(key)) > 1
                                              else given[key]) for key in given}
            try:
                query_args = model.model_validate(values)
            except (TypeError, ValueError) as error:  # pydantic's ValidationError is a ValueError
                raise QuerystringValidationError(error) from None
            return await route(*args, query_args=query_args, **kwargs)

        return validated

    return decorate

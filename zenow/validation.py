"""Turning pydantic's validation errors into what zenow tells a client (trio-free).

One formatter for every place that validates input (the `/api` routes, the `/v1`
shapes, the per-mode parameters): each bad field once, named by its dotted path without
the union-member tags pydantic adds (`content.str`, `stop.list[str]`), with its messages.
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .errors import InvalidRequest

__all__ = ["field_name", "field_problems", "invalid_request"]

_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict", "is-instance"})


def field_name(loc: tuple[int | str, ...], prefix: str = "") -> str:
    """The dotted field of a pydantic error location (`messages.0.content`), shown safely
    (a key that is not valid Unicode is escaped) and without union-member tags."""
    parts = [str(p).encode("utf-8", "backslashreplace").decode("utf-8") for p in loc]
    while parts and (parts[-1] in _TYPE_TAGS or "[" in parts[-1] or "-" in parts[-1]):
        parts.pop()
    return prefix + ".".join(parts)


def field_problems(error: ValidationError, prefix: str = "",
                   message: Callable[[ErrorDetails], str | None] | None = None) -> dict[str, list[str]]:
    """Each bad field (in order) with its distinct messages.  `message` may reword an error
    (return None to keep pydantic's)."""
    problems: dict[str, list[str]] = {}
    for item in error.errors():
        said = message(item) if message is not None else None
        if said is None:
            said = "must be a JSON object" if item["type"] in ("model_type", "dict_type") else item["msg"]
        found = problems.setdefault(field_name(item["loc"], prefix), [])
        if said not in found:
            found.append(said)
    return problems


def invalid_request(error: ValidationError, prefix: str = "") -> InvalidRequest:
    """One `InvalidRequest` naming every bad field (`where: what; ...`), `param` the first of them."""
    problems = field_problems(error, prefix)
    first = next(iter(problems), "")
    detail = "; ".join(f"{where or 'body'}: {' or '.join(messages)}" for where, messages in problems.items())
    return InvalidRequest(detail, param=first or None)

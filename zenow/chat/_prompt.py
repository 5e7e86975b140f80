"""Building the prompt: which stored messages fit the history budget (trio-free)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Turn", "history_within"]


@dataclass(frozen=True, slots=True)
class Turn:
    """A message as it is sent to the model, with its stored token count."""

    role: str
    content: str
    token_count: int


def history_within(budget: int, newest_first: Iterable[Turn]) -> list[Turn]:
    """The newest stored messages whose token counts sum to at most `budget`, oldest first.

    Whole messages only: the walk stops at the first message that does not fit, so
    history is always a contiguous run of the newest messages.  An assistant reply
    whose user message did not fit is dropped too: the model never sees an answer
    without its question.
    """
    kept: list[Turn] = []
    used = 0
    for turn in newest_first:
        if used + turn.token_count > budget:
            break
        kept.append(turn)
        used += turn.token_count
    kept.reverse()
    while kept and kept[0].role == "assistant":
        kept.pop(0)
    return kept

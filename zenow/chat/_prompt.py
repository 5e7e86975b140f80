"""Building the prompt: which stored messages fit the history budget (trio-free).

Two rules, both taking whole messages, a contiguous run of the newest, never starting
with an answer whose question was left out:

* `history_within(budget, ...)`: as many of the newest messages as fit.  On a session
  over its budget the oldest kept message changes on every turn, so the prompt's
  prefix changes and llama-server recomputes the whole history each time.
* `history_in_steps(budget, end_offset, ...)`: what the chat streamer uses.  The
  history starts at an *anchor*, a multiple of `step` tokens counted from the start of
  the session (every message has a fixed offset there: the sum of the token counts of
  the messages before it).  The anchor is the smallest multiple that leaves at most
  `budget` tokens after it, so it moves only when the session grows past the next
  multiple: then old messages are dropped in one step of about `step` tokens, and for
  the following turns the prompt only grows at its end.  llama-server keeps the
  conversation's tokens in its slot and reuses the identical prefix: only the new
  messages are computed.  The price is a history between `budget - step` and `budget`
  tokens instead of always close to `budget`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Turn", "history_anchor", "history_in_steps", "history_step", "history_within"]


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
    return _from_a_question(kept)


def history_step(budget: int) -> int:
    """How many tokens of old history are dropped at once: half the budget (at least 1)."""
    return max(1, budget // 2)


def history_anchor(budget: int, end_offset: int, step: int | None = None) -> int:
    """Where the history of a session holding `end_offset` tokens starts, in tokens from the
    session's start: the smallest multiple of `step` (default `history_step(budget)`) with
    at most `budget` tokens after it; 0 while everything fits."""
    step = step if step is not None else history_step(budget)
    over = end_offset - max(budget, 0)
    if over <= 0:
        return 0
    return -(-over // step) * step  # ceil(over / step) steps


def history_in_steps(budget: int, end_offset: int, newest_first: Iterable[Turn], step: int | None = None) -> list[Turn]:
    """The stored messages from the anchor on (see the module docstring), oldest first.

    `end_offset` is the sum of the token counts of every stored message of the session
    up to the newest one in `newest_first` (the session's `total_tokens` before the new
    messages are added).  The result never holds more than `budget` tokens, even if
    `end_offset` is off (a message added meanwhile): then the walk stops at the budget.
    Consecutive turns of a session get identical histories, plus the new messages at the
    end, until the session passes the next multiple of `step`.  `newest_first` is read
    only as far as needed.
    """
    anchor = history_anchor(budget, end_offset, step)
    kept: list[Turn] = []
    used = 0
    for turn in newest_first:
        used += turn.token_count
        if end_offset - used < anchor or used > budget:
            break
        kept.append(turn)
    return _from_a_question(kept)


def _from_a_question(newest_first: list[Turn]) -> list[Turn]:
    """`newest_first` oldest first, without the answers at its start."""
    kept = newest_first[::-1]
    start = 0
    while start < len(kept) and kept[start].role == "assistant":
        start += 1
    return kept[start:]

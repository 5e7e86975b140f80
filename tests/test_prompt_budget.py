"""Prompt budgeting (zenow.chat.history_within): whole newest messages within the budget."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from zenow.chat import Turn, history_within


def turns(*spec: tuple[str, int]) -> list[Turn]:
    """Oldest first: (role, token count) pairs, with numbered contents."""
    return [Turn(role, f"{role} {i}", count) for i, (role, count) in enumerate(spec)]


def newest_first(history: list[Turn]) -> list[Turn]:
    return list(reversed(history))


def test_everything_that_fits_is_kept_oldest_first():
    history = turns(("user", 3), ("assistant", 4), ("user", 5))
    assert history_within(100, newest_first(history)) == history


def test_the_walk_stops_at_the_first_message_that_does_not_fit():
    history = turns(("user", 1), ("assistant", 50), ("user", 3), ("assistant", 4))
    # the 1-token message would fit, but it is older than one that does not: no gaps
    assert history_within(10, newest_first(history)) == history[2:]


def test_the_budget_is_inclusive():
    history = turns(("user", 5), ("assistant", 5))
    assert history_within(10, newest_first(history)) == history
    assert history_within(9, newest_first(history)) == []  # the reply alone would lose its question


def test_an_answer_is_never_kept_without_its_question():
    history = turns(("user", 8), ("assistant", 2), ("user", 2), ("assistant", 2))
    assert history_within(6, newest_first(history)) == history[2:]
    assert history_within(3, newest_first(history)) == []  # only the last answer fits: dropped


def test_nothing_fits_a_zero_or_negative_budget():
    history = turns(("user", 1))
    assert history_within(0, newest_first(history)) == []
    assert history_within(-5, newest_first(history)) == []
    assert history_within(0, newest_first(turns(("user", 0)))) == turns(("user", 0))


def test_the_newest_messages_are_read_lazily():
    """The store pages newest messages in: the walk stops reading once the budget is spent."""
    read = []

    def pages():
        for turn in newest_first(turns(*[("user", 10)] * 1000)):
            read.append(turn)
            yield turn

    assert len(history_within(35, pages())) == 3
    assert len(read) == 4


roles = st.sampled_from(["user", "assistant", "system"])


@given(history=st.lists(st.tuples(roles, st.integers(0, 50)), max_size=40), budget=st.integers(-10, 400))
def test_the_kept_history_is_the_longest_fitting_newest_run(history, budget):
    all_turns = turns(*history)
    kept = history_within(budget, newest_first(all_turns))
    assert sum(t.token_count for t in kept) <= max(budget, 0) or not kept
    assert kept == all_turns[len(all_turns) - len(kept):]  # a contiguous run of the newest
    assert not kept or kept[0].role != "assistant"
    # maximal: taking one more (older) message would break the budget, or leave a leading answer
    fitting = 0
    used = 0
    for turn in newest_first(all_turns):
        if used + turn.token_count > budget:
            break
        used += turn.token_count
        fitting += 1
    longest = all_turns[len(all_turns) - fitting:]
    while longest and longest[0].role == "assistant":
        longest = longest[1:]
    assert kept == longest

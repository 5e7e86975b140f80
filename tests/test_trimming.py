"""History trimming in steps: on a session over its budget the prompt's prefix stays the same from
turn to turn (llama-server reuses it), old messages are dropped in steps, and the history always
stays within the budget."""

from __future__ import annotations

import itertools
import json

from hypothesis import given
from hypothesis import strategies as st

from tests.support.harness import make_settings, start_zenow
from tests.support.llama import FAKE_LLAMA_SERVER
from tests.support.tiny_models import write_stub_model
from zenow.chat import Turn, history_anchor, history_in_steps, history_step, history_within


def conversation(sizes: list[tuple[int, int]]) -> list[Turn]:
    """Oldest first: a (question, answer) token count pair per exchange."""
    turns = []
    for n, (question, answer) in enumerate(sizes):
        turns += [Turn("user", f"q{n}", question), Turn("assistant", f"a{n}", answer)]
    return turns


def trimmed(budget: int, history: list[Turn]) -> list[Turn]:
    return history_in_steps(budget, sum(t.token_count for t in history), reversed(history))


exchanges = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 60)), min_size=1, max_size=60)


@given(sizes=exchanges, budget=st.integers(1, 400))
def test_the_prefix_holds_between_steps_and_the_budget_always_holds(sizes, budget):
    history = conversation(sizes)
    step = history_step(budget)
    drops = 0
    previous: list[Turn] | None = None
    for end in range(2, len(history) + 1, 2):  # after each exchange, as the next chat sees it
        kept = trimmed(budget, history[:end])
        assert sum(t.token_count for t in kept) <= budget
        assert kept == history[end - len(kept):end]  # whole newest messages, contiguous
        assert not kept or kept[0].role == "user"
        if previous is not None and kept[:len(previous)] != previous:
            drops += 1  # the prefix changed: the anchor moved by whole steps
        previous = kept
    total = sum(t.token_count for t in history)
    assert drops <= -(-max(0, total - budget) // step)  # at most one drop per step of growth


@given(sizes=exchanges, budget=st.integers(1, 400))
def test_a_drop_keeps_at_least_the_budget_less_one_step_and_two_messages(sizes, budget):
    history = conversation(sizes)
    total = sum(t.token_count for t in history)
    kept = trimmed(budget, history)
    if history_anchor(budget, total) > 0:
        largest = max(t.token_count for t in history)
        assert sum(t.token_count for t in kept) >= budget - history_step(budget) - 2 * largest
    else:
        assert kept == history_within(budget, reversed(history)) or kept == history  # nothing to trim


@given(sizes=exchanges, budget=st.integers(-5, 400), error=st.integers(-500, 500))
def test_a_wrong_session_total_never_breaks_the_budget(sizes, budget, error):
    history = conversation(sizes)
    total = max(0, sum(t.token_count for t in history) + error)
    kept = history_in_steps(budget, total, reversed(history))
    assert sum(t.token_count for t in kept) <= max(budget, 0) or all(t.token_count == 0 for t in kept)
    assert kept == history[len(history) - len(kept):]


def test_the_anchor_moves_in_whole_steps():
    assert history_anchor(100, 80) == 0
    assert history_anchor(100, 100) == 0
    assert [history_anchor(100, end) for end in (101, 150, 151, 200, 201)] == [50, 50, 100, 100, 150]


async def test_consecutive_turns_of_an_over_budget_session_share_their_prefix(nursery, tmp_path, monkeypatch):
    """Through zenow and the fake llama-server: what each turn sends starts with what the turn
    before sent, except at a step, and the history never exceeds half the context."""
    log = tmp_path / "fake-events.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_EVENT_LOG", str(log))
    home = tmp_path / "home"
    write_stub_model(home / "models" / "llm" / "fake.gguf")
    async with start_zenow(nursery, make_settings(home, llama_server=str(FAKE_LLAMA_SERVER))) as zenow:
        client = zenow.client
        await client.post("/api/models/update_param", json={"context_size": 256, "system_prompt": "Be brief."})
        assert (await client.post("/api/models/load", json={"model_name": "fake"})).status_code == 200
        sid = (await client.post("/api/sessions", json={"first_message": "hi"})).json()["session_id"]
        for i in range(30):  # 16 tokens an exchange: far over the budget of 128 - 2 tokens
            await client.post(f"/api/sessions/{sid}/messages",
                              json={"role": "user", "content": f"old question {i} with a few more words"})
            await client.post(f"/api/sessions/{sid}/messages",
                              json={"role": "assistant", "content": f"answer {i} with a few more words"})
        turns = 16
        for n in range(turns):
            answer = await client.post("/api/chat", json={
                "session_id": sid, "stream": False, "messages": [{"role": "user", "content": f"new question {n}"}]})
            assert answer.status_code == 200, answer.text
        stored = (await client.get(f"/api/sessions/{sid}/messages")).json()["messages"]
    counts = {m["content"]: m["token_count"] for m in stored}
    found = [json.loads(line) for line in log.read_text().splitlines()]
    prompts = [e["body"]["messages"] for e in found
               if e["event"] == "request" and e["path"] == "/v1/chat/completions"]
    assert len(prompts) == turns
    budget = 256 // 2 - 2  # "Be brief." is 2 fake tokens
    changed = 0
    for before, after in itertools.pairwise(prompts):
        assert before[0] == after[0] == {"role": "system", "content": "Be brief."}
        if after[:len(before)] != before:
            changed += 1
    for prompt in prompts:
        history = prompt[1:-1]
        assert sum(counts[m["content"]] for m in history) <= budget
        assert history[0]["role"] == "user" and len(history) >= 4
    # each turn adds 3 + 6 tokens ("new question n", "Hello from the fake server." as 6 streamed tokens):
    # 15 turns grow the session by 135 tokens, which is 3 steps of 63 tokens at most
    assert 1 <= changed <= 3, f"the prefix changed on {changed} of {turns - 1} turns"
    # (trimming one message at a time would have changed it on every turn)

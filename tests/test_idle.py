"""The idle timer (`zenow.servers._idle`) on trio's fake clock, and the metrics relabelling (trio-free)."""

from __future__ import annotations

import trio

from zenow.metrics import relabelled, render
from zenow.servers import Activity
from zenow.servers._idle import idle_expired, watch_idle


async def test_an_idle_server_is_stopped_after_keep_alive_and_a_busy_one_never(autojump_clock, nursery):
    activity = Activity()
    stops: list[float] = []
    running = [True]
    keep_alive = [5.0]

    async def stop() -> None:
        stops.append(trio.current_time())
        running[0] = False
        activity.notify()

    activity.touch()
    start = trio.current_time()
    nursery.start_soon(watch_idle, activity, lambda: keep_alive[0], lambda: running[0], stop)
    await trio.sleep(3)
    activity.begin()  # a request holds it far longer than keep_alive
    await trio.sleep(60)
    assert stops == []
    activity.end()
    await trio.sleep(4.9)
    assert stops == []
    await trio.sleep(0.2)
    assert stops == [start + 3 + 60 + 5]

    running[0], keep_alive[0] = True, -1.0  # forever: started again, never stopped
    activity.touch()
    await trio.sleep(3600)
    assert len(stops) == 1 and not idle_expired(activity, -1)
    keep_alive[0] = 2.0
    activity.touch()  # a parameter change resets the timer
    await trio.sleep(2.1)
    assert len(stops) == 2


def test_llama_server_figures_are_labelled_with_the_mode():
    text = ("# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.\n"
            "# TYPE llamacpp:prompt_tokens_total counter\nllamacpp:prompt_tokens_total 42\n"
            "# HELP llamacpp:requests_processing Number of requests processing.\n"
            "# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 1\n")
    families = relabelled(text, "llm")
    assert [(s.name, s.labels, s.value) for f in families for s in f.samples] == [
        ("llamacpp:prompt_tokens_total", {"mode": "llm"}, 42.0),
        ("llamacpp:requests_processing", {"mode": "llm"}, 1.0)]
    out = render({"llm": text, "embed": text, "rerank": None, "broken": "not { prometheus"}).decode()
    assert 'llamacpp:prompt_tokens_total{mode="llm"} 42.0' in out
    assert 'llamacpp:prompt_tokens_total{mode="embed"} 42.0' in out
    assert out.count("# TYPE llamacpp:prompt_tokens_total counter") == 1
    assert 'zenow_llama_server_metrics_up{mode="rerank"} 0.0' in out
    assert 'zenow_llama_server_metrics_up{mode="broken"} 0.0' in out

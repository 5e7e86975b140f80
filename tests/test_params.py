"""Per-mode parameters (zenow.servers._params): defaults, bounds, the context override, stored values."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zenow.errors import InvalidRequest
from zenow.servers._params import (
    CONTEXT_OVERFLOW_KEY,
    CONTEXT_UNKNOWN_MODEL_MAX,
    PARALLEL_MAX,
    SERVER_KEYS,
    SYSTEM_PROMPT_MAX,
    Bounds,
    backend_url_checked,
    defaults_for,
    effective_context,
    restore_stored,
    validate_update,
)

TWO_CORES = Bounds(cores=2)
SMOL = Bounds(cores=2, model_name="SmolLM2", trained_context=8192)


def llm() -> dict:
    return defaults_for("llm", "You are a helpful assistant.", 2)


def refusal(changes, bounds=TWO_CORES, mode="llm", current=None, overflow=False) -> str:
    with pytest.raises(InvalidRequest) as caught:
        validate_update(mode, current or defaults_for(mode, "S", 2), changes, bounds, overflow)
    return str(caught.value)


def test_defaults_follow_the_spec_and_the_machine():
    assert {k: v for k, v in llm().items() if k != "system_prompt"} == {
        "context_size": 8192, "threads": 2, "gpu_layers": 0, "batch_size": 512,
        "temperature": 0.7, "repeat_penalty": 1.1, "max_tokens": 2048, "parallel": 4, "rpc_servers": [],
        "keep_alive": -1, "backend_url": "", "backend_model": "", "flash_attn": "auto",
    }
    assert defaults_for("embed", "", 64)["threads"] == 8  # at most 8 by default
    assert set(defaults_for("rerank", "", 1)) == {"context_size", "threads", "gpu_layers", "batch_size", "rpc_servers",
                                                  "keep_alive", "backend_url", "backend_model", "flash_attn"}
    assert defaults_for("embed", "", 1)["keep_alive"] == defaults_for("rerank", "", 1)["keep_alive"] == -1


def test_a_lone_surrogate_in_the_system_prompt_is_refused_naming_the_field():
    message = refusal({"system_prompt": "hi \ud800 there"})
    assert message.startswith("system_prompt:") and "lone surrogate" in message
    message.encode("utf-8")  # the message itself can be sent


def test_the_system_prompt_is_bounded():
    assert "system_prompt" in refusal({"system_prompt": "x" * (SYSTEM_PROMPT_MAX + 1)})
    update = validate_update("llm", llm(), {"system_prompt": "x" * SYSTEM_PROMPT_MAX}, TWO_CORES, False)
    assert len(update.parameters["system_prompt"]) == SYSTEM_PROMPT_MAX


def test_threads_are_at_most_the_cores():
    assert refusal({"threads": 3}) == "threads: 3 is more than the 2 CPU cores available"
    assert validate_update("llm", llm(), {"threads": 2}, TWO_CORES, False).parameters["threads"] == 2


def test_max_tokens_of_a_trillion_is_refused():
    assert refusal({"max_tokens": 10**12}).startswith("max_tokens:")


def test_context_beyond_the_trained_one_needs_the_override():
    message = refusal({"context_size": 16384}, SMOL)
    assert message == ('context_size: 16384 is more than the 8192 tokens SmolLM2 was trained for; '
                       'add "allow_context_overflow": true to the update to use it anyway')
    update = validate_update("llm", llm(), {"context_size": 16384, CONTEXT_OVERFLOW_KEY: True}, SMOL, False)
    assert update.parameters["context_size"] == 16384 and update.context_overflow is True
    assert update.stored == {"context_size": 16384, CONTEXT_OVERFLOW_KEY: True}
    assert CONTEXT_OVERFLOW_KEY not in update.parameters  # never shown by get_param


def test_a_context_update_without_the_override_clears_it():
    update = validate_update("llm", llm(), {"context_size": 4096}, SMOL, True)
    assert update.context_overflow is False and update.stored[CONTEXT_OVERFLOW_KEY] is False
    other = validate_update("llm", llm(), {"temperature": 0.1}, SMOL, True)
    assert other.context_overflow is True and other.stored == {"temperature": 0.1}


def test_without_a_model_the_context_has_a_hard_bound():
    assert "131072" in refusal({"context_size": CONTEXT_UNKNOWN_MODEL_MAX + 1})
    assert validate_update("llm", llm(), {"context_size": CONTEXT_UNKNOWN_MODEL_MAX}, TWO_CORES, False)
    forced = validate_update("llm", llm(), {"context_size": 262144, CONTEXT_OVERFLOW_KEY: True}, TWO_CORES, False)
    assert forced.parameters["context_size"] == 262144
    assert "context_size" in refusal({"context_size": 1_048_576 * 16, CONTEXT_OVERFLOW_KEY: True})


@pytest.mark.parametrize(("changes", "expected"), [
    ({CONTEXT_OVERFLOW_KEY: True, "temperature": 0.1}, "only applies together with context_size"),
    ({CONTEXT_OVERFLOW_KEY: "yes", "context_size": 4096}, "must be true or false"),
    ({CONTEXT_OVERFLOW_KEY: True}, "body: no parameters given"),
])
def test_the_override_is_checked_too(changes, expected):
    assert expected in refusal(changes, SMOL)


def test_many_unknown_keys_make_a_short_message_that_can_be_sent():
    message = refusal({f"key{i}": i for i in range(500)})
    assert message.count("not a parameter") == 10 and message.endswith("and 490 more")
    assert len(message) < 5000
    surrogates = refusal({f"key{i}\udc80": i for i in range(500)})
    assert surrogates.count("must be valid Unicode") == 10 and "key0\\udc80" in surrogates
    surrogates.encode("utf-8")


def test_the_context_a_model_starts_with():
    assert effective_context(8192, 4096, False) == 4096
    assert effective_context(8192, 4096, True) == 8192
    assert effective_context(2048, 4096, False) == 2048
    assert effective_context(8192, None, False) == 8192


def test_bad_stored_values_fall_back_to_their_defaults():
    stored = {
        "system_prompt": "broken \ud800", "threads": 64, "context_size": "big", "temperature": 0.2,
        "batch_size": 10**12, "gone_key": 1, CONTEXT_OVERFLOW_KEY: "maybe",
    }
    params, overflow, problems = restore_stored("llm", llm(), stored, TWO_CORES)
    assert params == {**llm(), "temperature": 0.2}
    assert overflow is False
    assert len(problems) == 5
    assert any(p.startswith("stored value 'broken \\ud800' is refused (system_prompt:") for p in problems)
    assert all(p.isascii() for p in problems)


def test_a_stored_override_keeps_its_context():
    stored = {"context_size": 262144, CONTEXT_OVERFLOW_KEY: True}
    params, overflow, problems = restore_stored("llm", llm(), stored, TWO_CORES)
    assert (params["context_size"], overflow, problems) == (262144, True, [])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=10,
)


@given(stored=st.dictionaries(st.sampled_from([*llm(), CONTEXT_OVERFLOW_KEY, "other"]), json_values))
def test_whatever_is_stored_restoring_answers_valid_parameters(stored):
    params, overflow, _ = restore_stored("llm", llm(), stored, TWO_CORES)
    assert set(params) == set(llm()) and isinstance(overflow, bool)
    json.dumps(params).encode("utf-8")
    assert 1 <= params["threads"] <= 2


def test_parallel_slots_are_an_llm_server_parameter_within_bounds():
    assert "parallel" in SERVER_KEYS and "parallel" not in defaults_for("embed", "", 2)
    assert validate_update("llm", llm(), {"parallel": 1}, TWO_CORES, False).parameters["parallel"] == 1
    assert validate_update("llm", llm(), {"parallel": PARALLEL_MAX}, TWO_CORES, False).stored == {
        "parallel": PARALLEL_MAX}
    for bad in (0, PARALLEL_MAX + 1, "4", 2.5):
        assert refusal({"parallel": bad}).startswith("parallel:")
    assert refusal({"parallel": 2}, mode="embed").startswith("parallel: not a parameter of mode embed")


def test_a_backend_url_is_kept_as_the_servers_root():
    assert backend_url_checked("") == ""
    assert backend_url_checked("HTTP://Farm.Example:8080/v1/") == "http://farm.example:8080"
    assert backend_url_checked("https://gw.example/llama/") == "https://gw.example/llama"
    assert backend_url_checked("http://[::1]:8080") == "http://[::1]:8080"
    update = validate_update("llm", llm(), {"backend_url": "http://10.0.0.5:8080/"}, TWO_CORES, False)
    assert update.stored == {"backend_url": "http://10.0.0.5:8080"}
    assert refusal({"backend_url": "http://u:secret@h"}).startswith("backend_url: must not hold credentials")
    assert "secret" not in refusal({"backend_url": "http://u:secret@h"})

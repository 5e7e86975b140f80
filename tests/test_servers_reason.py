"""Why a llama-server failed, from its log (zenow.servers._reason): the reason, not the noise."""
# ruff: noqa: E501 - real llama-server log lines, kept whole

from __future__ import annotations

from zenow.servers._reason import failure_reason

# The pinned llama-server, started on a file with a whole GGUF header but no model in it.
MISSING_HYPERPARAMETER = """\
0.00.000.796 I srv  llama_server: initializing ...
0.00.001.892 I cmn  common_param: common_params_print_info: verbosity = 3 (adjust with the `-lv N` CLI arg)
0.00.001.985 I srv  init_listene: The UI is disabled
0.00.001.986 I srv  init_listene: Use --ui/--no-ui (or deprecated --webui/--no-webui) to enable/disable
0.00.002.035 W srv  llama_server: security: no API key is set and CORS allows all origins (see https://github.com/ggml-org/llama.cpp/pull/25655)
0.00.003.455 I srv    load_model: loading model '/tmp/tm/missing.gguf'
0.00.003.693 E llama_model_load: error loading model: error loading model hyperparameters: key not found in model: llama.attention.layer_norm_rms_epsilon
0.00.003.701 E llama_model_load_from_file_impl: failed to load model
0.00.004.261 E common_fit_params: encountered an error while trying to fit params to free device memory: failed to load model
0.00.004.317 E llama_model_load: error loading model: error loading model hyperparameters: key not found in model: llama.attention.layer_norm_rms_epsilon
0.00.004.322 E llama_model_load_from_file_impl: failed to load model
0.00.004.328 E cmn  common_init_: failed to load model '/tmp/tm/missing.gguf'
0.00.004.333 E srv    load_model: failed to load model, '/tmp/tm/missing.gguf'
0.00.004.343 I srv    operator(): operator(): cleaning up before exit...
0.00.004.558 E srv  llama_server: exiting due to model loading error
"""

# ...on a file cut short (an incomplete download).
TRUNCATED = """\
0.00.003.780 I srv    load_model: loading model '/tmp/tm/trunc.gguf'
0.00.004.050 E llama_model_load: error loading model: tensor 'blk.0.ffn_down.weight' data is not within the file bounds, model is corrupted or incomplete
0.00.004.074 E llama_model_load_from_file_impl: failed to load model
0.00.004.095 E common_fit_params: encountered an error while trying to fit params to free device memory: failed to load model
0.00.004.233 E llama_model_load: error loading model: tensor 'blk.0.ffn_down.weight' data is not within the file bounds, model is corrupted or incomplete
0.00.004.248 E llama_model_load_from_file_impl: failed to load model
0.00.004.250 E cmn  common_init_: failed to load model '/tmp/tm/trunc.gguf'
0.00.004.250 E srv    load_model: failed to load model, '/tmp/tm/trunc.gguf'
0.00.004.252 I srv    operator(): operator(): cleaning up before exit...
0.00.004.603 E srv  llama_server: exiting due to model loading error
"""

# ...on the GGUF magic followed by random bytes.
GARBAGE = """\
0.00.003.505 I srv    load_model: loading model '/tmp/tm/garbage.gguf'
0.00.003.581 E gguf_init_from_reader: this GGUF file is version 2533475380 but this software only supports up to version 3
0.00.003.598 E gguf_init_from_reader: failed to read header
0.00.003.649 E llama_model_load: error loading model: llama_model_loader: failed to load model from /tmp/tm/garbage.gguf
0.00.003.668 E llama_model_load_from_file_impl: failed to load model
0.00.003.689 E gguf_init_from_reader: this GGUF file is version 2533475380 but this software only supports up to version 3
0.00.003.700 E gguf_init_from_reader: failed to read header
0.00.003.707 E srv    load_model: failed to load model, '/tmp/tm/garbage.gguf'
0.00.004.019 E srv  llama_server: exiting due to model loading error
"""


def test_a_load_failure_gives_the_one_line_that_says_why():
    assert failure_reason(MISSING_HYPERPARAMETER.splitlines()) == (
        "error loading model: error loading model hyperparameters: key not found in model: "
        "llama.attention.layer_norm_rms_epsilon"
    )


def test_a_truncated_file_says_so():
    assert failure_reason(TRUNCATED.splitlines()) == (
        "error loading model: tensor 'blk.0.ffn_down.weight' data is not within the file bounds, "
        "model is corrupted or incomplete"
    )


def test_every_distinct_reason_is_kept_once_in_order():
    assert failure_reason(GARBAGE.splitlines()) == (
        "this GGUF file is version 2533475380 but this software only supports up to version 3; "
        "failed to read header; error loading model: llama_model_loader: failed to load model from "
        "/tmp/tm/garbage.gguf"
    )


def test_an_assertion_keeps_the_assertion_not_the_source_path():
    lines = ["0.01.000.000 I srv  log_server_r: request: POST /completion 127.0.0.1 200",
             "/build/ggml/src/ggml-cpu/ops.cpp:4242: GGML_ASSERT(n_tokens <= n_batch) failed"]
    assert failure_reason(lines) == "GGML_ASSERT(n_tokens <= n_batch) failed"


def test_without_a_telling_line_the_last_lines_are_given():
    assert failure_reason(["0.00.1 I srv  a: one", "two", "three", "four", ""]) == "two; three; four"
    assert failure_reason([]) == ""


def test_the_reason_is_bounded():
    reason = failure_reason([f"error number {i}: " + "x" * 100 for i in range(40)])
    assert len(reason) == 500 and reason.endswith("...")

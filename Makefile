# Each target makes .venv if missing and installs torch first (2.13.0: here the CPU build from a local
# file), so that pip never pulls a multi-GB CUDA build to satisfy the package's torch requirement.
# DeepSpeed (a source package) is built without its C++/CUDA ops (DS_BUILD_OPS=0): they compile when first used.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.poft-installed

.PHONY: demo quickstart test bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/poft demo --output poft-demo

quickstart: $(STAMP)
	$(BIN)/poft quickstart --output poft-quickstart

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 tests

bench: $(STAMP)
	$(BIN)/python bench/scoring.py
	$(BIN)/python bench/training_step.py

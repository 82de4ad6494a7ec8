# Quick start:  make demo   (runs the whole pipeline on the embedded example)
#               make test   (runs the whole test suite, as CI does)
#               make test-fast (the quick loop: every test not marked slow)
#               make lint   (ruff + the type checker; CI runs it before the tests)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Test processes (pytest-xdist). Two: CI has 2 cores, and many tests start `cscope` subprocesses.
# The example's tests stay on one worker (tests/conftest.py), so its pipeline runs once.
WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup

.PHONY: install demo test test-fast lint bench clean

$(BIN)/cscope: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision first, pinned: on this kind of machine both come from the local disk.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/cscope

install: $(BIN)/cscope

demo: install
	rm -rf demo
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/cscope init --example demo
	cd demo && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 ../$(BIN)/cscope run

test: install
	$(PYTEST) tests

test-fast: install
	$(PYTEST) -m "not slow" tests

lint: install
	$(BIN)/ruff check conceptscope_cli tests benchmarks
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/extract.py

clean:
	rm -rf $(VENV) demo .pytest_cache

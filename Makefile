# Every command uses .venv/bin/python; `make setup` is idempotent and quick when nothing changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
TORCH_VERSION := 2.13.0
# For an NVIDIA GPU: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
# The instance `corpus run` records its runs in (<lake>/dagster_home), so the UI shows them.
DAGSTER_HOME ?= $(or $(CORPUS_LAKE),$(CURDIR)/data/lake)/dagster_home

.PHONY: setup run test lint format ui bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m corpus.tokenizer install
	touch $(STAMP)

run: setup
	$(VENV)/bin/corpus run

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

ui: setup
	mkdir -p $(DAGSTER_HOME)
	test -f $(DAGSTER_HOME)/dagster.yaml || printf 'telemetry:\n  enabled: false\n' > $(DAGSTER_HOME)/dagster.yaml
	DAGSTER_HOME=$(DAGSTER_HOME) $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1

bench: setup
	$(PY) benchmarks/windows.py

clean:
	rm -rf data/lake data/dagster_home data/metrics.duckdb

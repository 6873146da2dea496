# Every command uses .venv/bin/python; `make setup` is idempotent and quick when nothing changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
TORCH_VERSION := 2.13.0
# For an NVIDIA GPU: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=

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

# The UI opens the instance `corpus run` records its runs in, <lake>/dagster_home ($CORPUS_LAKE resolved as
# the CLI resolves it), so they show there; a DAGSTER_HOME set in the environment wins.
ui: setup
	@home="$${DAGSTER_HOME:-$$($(PY) -c 'from orchestration.resources import LakePaths, default_lake; print(LakePaths(default_lake()).dagster_home)')}" && \
	mkdir -p "$$home" && \
	{ test -f "$$home/dagster.yaml" || printf 'telemetry:\n  enabled: false\n' > "$$home/dagster.yaml"; } && \
	echo "DAGSTER_HOME=$$home" && \
	DAGSTER_HOME="$$home" exec $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1

bench: setup
	$(PY) benchmarks/windows.py

clean:
	rm -rf data/lake data/dagster_home data/metrics.duckdb

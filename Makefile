# graft's command index. `make run` and `make test` set everything up on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export PATH := $(abspath $(BIN)):$(PATH)
# Offline by design: no telemetry from Prefect, DVC or Great Expectations.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export GX_ANALYTICS_ENABLED := False
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
# mkdocs-material's banner about MkDocs 2.0 on every build
export NO_MKDOCS_2_WARNING := 1

.PHONY: help env dvc-remote run sample-data repro test test-serve test-fast docs bench lint format clean

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# Where `dvc push` and `dvc pull` go when the project has no DVC remote yet: a folder outside
# the checkout, shared by every clone on this machine. Set for this checkout only (in
# .dvc/config.local, never committed); a remote in .dvc/config (S3, SSH: see docs/dvc.md) wins.
DVC_REMOTE ?= $(HOME)/.local/share/graft/dvc-remote
ADD_DVC_REMOTE = if [ -z "$$($(BIN)/dvc remote list)" ]; then \
		$(BIN)/dvc remote add --local --default local "$(DVC_REMOTE)" && \
		echo "DVC remote 'local' -> $(DVC_REMOTE) (.dvc/config.local)"; fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[train,dev]"
	@$(ADD_DVC_REMOTE)
	touch $@

env: $(STAMP) dvc-remote  ## create .venv with graft and its dependencies, and a DVC remote

dvc-remote: $(STAMP)  ## use a local DVC remote (make dvc-remote DVC_REMOTE=DIR) unless one is set
	@$(ADD_DVC_REMOTE)

sample-data: $(STAMP)  ## write the embedded digits sample into data/ if data/ is empty
	@if [ -z "$$(ls -A data 2>/dev/null)" ]; then \
		$(BIN)/graft sample-data && $(BIN)/dvc commit --force --quiet data.dvc; \
	else echo "data/ already has files: using them."; fi

run: sample-data  ## run the Prefect training flow end to end (validate ... export)
	$(BIN)/python flows/training.py

# graft check-data first: plain `dvc repro` records a changed data/ itself and replaces links
# under it by copies; this stops instead, naming what changed (`graft check-data --record` records it).
repro: sample-data  ## the same pipeline through `dvc repro`, after graft check-data
	$(BIN)/graft check-data
	$(BIN)/dvc repro

# Tests run on TEST_WORKERS processes (pytest-xdist; 0 = in pytest's own), each with one torch
# thread: two workers with two threads each on two cores only wait on each other.
TEST_WORKERS ?= 2
PYTEST = OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

test: $(STAMP) lint docs test-serve  ## lint, the docs build, the whole test suite (slow tests included) and test-serve
	$(PYTEST)

# The serving side alone: a venv with graft's `serve` extra and the test runner, no torch (the
# same install as the Dockerfile's serve stage). Its tests use the committed fixture models.
SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed

$(SERVE_STAMP): pyproject.toml
	rm -rf $(SERVE_VENV)
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install --quiet -e ".[serve]" pytest pytest-timeout httpx "tritonclient[http]"
	touch $@

test-serve: $(SERVE_STAMP)  ## server and predict tests in .venv-serve: the serve extra alone, no torch
	GRAFT_SERVE_ONLY_VENV=1 $(SERVE_VENV)/bin/python -m pytest tests/test_serve.py tests/test_serve_int8.py tests/test_serve_ops.py tests/test_serve_v2.py tests/test_predict.py

test-fast: $(STAMP)  ## the quick tests only (tiny models, no real weights)
	$(PYTEST) -m "not slow"

docs: $(STAMP)  ## build the documentation site into site/ (strict: a broken link or anchor fails)
	$(BIN)/mkdocs build --strict --quiet

bench: $(STAMP)  ## benchmarks; figures go to bench/results/
	$(BIN)/python bench/finetune_prefix_cache.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/validate.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/infer.py

lint: $(STAMP)  ## ruff lint and format check, and the import contracts (pyproject.toml) by lint-imports
	$(BIN)/ruff check src flows tests bench
	$(BIN)/ruff format --check src flows tests bench
	$(BIN)/lint-imports --no-cache

format: $(STAMP)  ## apply ruff's formatting and safe fixes
	$(BIN)/ruff check --fix src flows tests bench
	$(BIN)/ruff format src flows tests bench

clean:  ## remove pipeline outputs (never data/, never models/production/)
	rm -rf artifacts metrics plots reports dvclive .pytest_cache
	find models -mindepth 1 -maxdepth 1 ! -name production -exec rm -rf {} + 2>/dev/null || true

# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLES ?= samples
DRILL_FLAGS ?=
# pip shows what it fetches and installs: a first setup takes minutes and must not look hung.
PIP := $(BIN)/pip install --disable-pip-version-check --progress-bar on
# Each install step leaves a stamp: a second `make test` or `make demo` skips what is installed already,
# and a changed pyproject.toml installs again.
TORCH_STAMP := $(VENV)/.installed-torch
DEMO_STAMP := $(VENV)/.installed-demo
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: dev demo test lint typecheck unit reformat clean differential bench-server

$(BIN)/python:
	@echo "make: creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

# torch is pinned first so that nothing later can pull a multi-gigabyte CUDA build.
$(TORCH_STAMP): | $(BIN)/python
	@echo "make: installing torch 2.13.0, pinned before anything that depends on it"
	$(PIP) torch==2.13.0
	touch $@

# The main job needs trainguard and what writes the sample checkpoints, not the development toolchain.
$(DEMO_STAMP): pyproject.toml $(TORCH_STAMP)
	@echo "make: installing trainguard for the demo"
	$(PIP) -e '.[demo]'
	touch $@

$(DEV_STAMP): pyproject.toml $(TORCH_STAMP)
	@echo "make: installing trainguard with the development and test toolchain"
	$(PIP) -e '.[dev]'
	touch $@

dev: $(DEV_STAMP)

# The main job: the drill replays the incident against a real training job and scores the defences
# (DRILL_FLAGS narrows it, e.g. DRILL_FLAGS="--attacks a b"). The samples it scans first are what the
# README's examples use.
demo: $(DEMO_STAMP)
	rm -rf $(SAMPLES)
	$(BIN)/python examples/make_samples.py $(SAMPLES)
	$(BIN)/trainguard scan $(SAMPLES) > /dev/null ; status=$$? ; \
	  if [ $$status -eq 1 ]; then echo "demo: the planted samples were caught (exit 1), the genuine ones passed"; \
	  else echo "demo: scanning the samples gave an unexpected exit $$status" ; exit 1 ; fi
	$(BIN)/trainguard drill $(DRILL_FLAGS)

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

unit:
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --durations=25

test: dev lint typecheck unit

reformat:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(SAMPLES) .mypy_cache .ruff_cache .pytest_cache

# The scanner against the real loaders, for longer than CI runs it (tests/attacks/test_differential.py).
differential: dev
	TRAINGUARD_FUZZ_SAMPLES=$${TRAINGUARD_FUZZ_SAMPLES:-20000} $(BIN)/python -m pytest -q -s -p no:cacheprovider \
	  tests/attacks/test_differential.py -k fuzzed

# `trainguard serve` under 64 reporting jobs for 60 s, and killed and restarted mid-run (bench/README.md);
# needs PostgreSQL on 127.0.0.1:5432. BENCH_FLAGS=--quick for a smoke run.
bench-server: dev
	$(BIN)/python bench/server/run.py --markdown-out bench/out/server-results.md $(BENCH_FLAGS)

# Two commands from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLES ?= samples

.PHONY: dev demo test lint typecheck unit reformat clean differential

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned first so that nothing later can pull a multi-gigabyte CUDA build.
dev: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'

demo: dev
	rm -rf $(SAMPLES)
	$(BIN)/python examples/make_samples.py $(SAMPLES)
	$(BIN)/trainguard scan $(SAMPLES) ; status=$$? ; \
	  if [ $$status -eq 1 ]; then echo "demo: the planted samples were caught (exit 1), the genuine ones passed"; \
	  else echo "demo: unexpected exit $$status" ; exit 1 ; fi

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck:
	$(BIN)/mypy

unit:
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2

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

# `make serve` runs the example manifest (starting a local livekit-server if LIVEKIT_URL
# is unset); `make test` runs the test suite. Both install what they need into .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-fast lint format clean soak

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,agents]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/lkrun serve agents.toml.example

test: $(STAMP)
	$(BIN)/ruff check lkrun tests
	$(BIN)/pytest -v

# The fast tier: no livekit-server, no lkrun processes (seconds). `make test` runs it all.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check lkrun tests
	$(BIN)/ruff format --check lkrun tests

format: $(STAMP)
	$(BIN)/ruff format lkrun tests
	$(BIN)/ruff check --fix lkrun tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Not in CI: 200 dispatches with a server restart and killed jobs (a few minutes).
soak: $(STAMP)
	$(BIN)/python -m tests.soak

# Not in CI: lkrun vs the official LiveKit Agents worker on one livekit-server (about 15-20
# minutes at the defaults). Shrink it with e.g. BENCH_ARGS="--dispatches 10 --concurrency 1,5".
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

# `make serve` runs the example manifest (starting a local livekit-server if LIVEKIT_URL
# is unset); `make test` runs the test suite. Both install what they need into .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-fast lint format clean soak cluster redis

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,agents]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/lkrun serve agents.toml.example

test: $(STAMP) redis
	$(BIN)/ruff check lkrun tests
	$(BIN)/pytest -v

# The cluster tests and `make cluster` run a throwaway redis-server: use the system's, or
# install Debian's package when we are root on a machine with apt (CI); else say what to do.
redis:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing redis-server with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "error: redis-server not found: install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)" >&2; \
	    exit 1; \
	  fi; }

# Redis, two livekit-server nodes sharing it, and an lkrun daemon on the example manifest
# registered with each (README, Scaling out); Ctrl-C stops it all.
cluster: $(STAMP) redis
	$(BIN)/python -m lkrun.devcluster agents.toml.example

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

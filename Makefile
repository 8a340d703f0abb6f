# `make serve` runs the example manifest (starting a local livekit-server if LIVEKIT_URL
# is unset); `make test` runs the test suite. Both install what they need into .venv.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test test-fast lint format clean soak cluster redis browser

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,agents]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/lkrun serve agents.toml.example

test: $(STAMP) redis browser node-deps test-envs
	$(BIN)/ruff check lkrun tests
	$(BIN)/pytest -v

# The cluster tests and `make cluster` run a throwaway redis-server: $LKRUN_REDIS_SERVER
# (as lkrun.devcluster reads it), else the system's, else install Debian's package when we
# are root on a machine with apt (CI); else say what to do.
redis:
	@if [ -n "$$LKRUN_REDIS_SERVER" ]; then \
	  [ -f "$$LKRUN_REDIS_SERVER" ] && [ -x "$$LKRUN_REDIS_SERVER" ] || { \
	    echo "error: LKRUN_REDIS_SERVER=$$LKRUN_REDIS_SERVER is not an executable file" >&2; exit 1; }; \
	  exit 0; \
	fi; \
	command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing redis-server with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "error: redis-server not found: install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) or set LKRUN_REDIS_SERVER" >&2; \
	    exit 1; \
	  fi; }

# The dashboard's browser tests (tests/browser.py) drive Debian's chromium through its
# chromedriver, never a browser Selenium downloads: $LKRUN_CHROMIUM and $LKRUN_CHROMEDRIVER
# when both are set, else the system's, else install Debian's packages when we are root on a
# machine with apt (CI); else say what to do.
browser:
	@if [ -n "$$LKRUN_CHROMIUM$$LKRUN_CHROMEDRIVER" ]; then \
	  for b in "$$LKRUN_CHROMIUM" "$$LKRUN_CHROMEDRIVER"; do \
	    [ -f "$$b" ] && [ -x "$$b" ] || { \
	      echo "error: LKRUN_CHROMIUM and LKRUN_CHROMEDRIVER must both name executable files (got '$$LKRUN_CHROMIUM', '$$LKRUN_CHROMEDRIVER')" >&2; exit 1; }; \
	  done; exit 0; \
	fi; \
	{ command -v chromium >/dev/null || command -v chromium-browser >/dev/null; } && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "error: chromium and chromedriver not found: install them (Debian: sudo apt-get install chromium chromium-driver; Ubuntu: the chromium snap provides chromium.chromedriver; macOS: brew install --cask chromium chromedriver) or set LKRUN_CHROMIUM and LKRUN_CHROMEDRIVER" >&2; \
	    exit 1; \
	  fi; }

# Redis, two livekit-server nodes sharing it, and an lkrun daemon on the example manifest
# registered with each (README, Scaling out); Ctrl-C stops it all.
cluster: $(STAMP) redis
	$(BIN)/python -m lkrun.devcluster agents.toml.example

# The Node example's npm dependencies (examples/node/echo), installed once per package-lock.json
# under ~/.cache/lkrun/node and linked into the example; a notice instead where node is not
# installed (its tests then skip, saying so).
.PHONY: node-deps
node-deps: $(STAMP)
	$(BIN)/python -m tests.node_deps examples/node/echo

# The virtualenvs the tests run agents in (tests/envs.py ENVS: a bare interpreter, livekit and
# numpy older than the daemon's, each livekit-agents version in compat.TESTED), built once from
# the package index and cached under ~/.cache/lkrun/envs, before pytest: the tests only reuse
# them, so pip's minutes do not count against a test's timeout.
.PHONY: test-envs
test-envs: $(STAMP)
	$(BIN)/python -m tests.envs --all

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

# Not in CI: lkrun vs the official LiveKit Agents worker on one livekit-server (about 38
# minutes at the defaults on 2 cores). Shrink it with e.g.
# BENCH_ARGS="--dispatches 10 --concurrency 1,5". Everything goes to results/bench-<time>/
# (ignored by git); results.md and results.json are also copied to benchmarks/bench-<time>/,
# to commit when the README quotes the run (benchmarks/README.md).
.PHONY: bench
bench: $(STAMP)
	$(BIN)/python -m tests.bench --copy-to benchmarks $(BENCH_ARGS)

# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-prefect-lowest lint docs ui screenshots demo soak scale bench bench-recheck profile emulator clean system-packages

# Compiled modules are cached in __pycache__ (Python's default, which some machines turn off
# with PYTHONDONTWRITEBYTECODE): the suite's hundred-odd subprocesses import the package and
# the tools again, and would compile them each time.
unexport PYTHONDONTWRITEBYTECODE
# Offline by default: no telemetry calls from the ephemeral Prefect server.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# A fresh Prefect home migrates its database before the ephemeral server answers; on a busy
# 2-core machine that took longer than Prefect's default 20 s wait.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# uv installs what pip would, from the same index, in half of pip's time on 2 cores (the
# environment was most of a clean clone's set-up). --compile-bytecode, as pip does: where
# PYTHONDONTWRITEBYTECODE is set (it is on CI's machines), every process of the suite would
# otherwise compile each module it imports, Prefect's included.
UV_INSTALL := $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python
$(BIN)/uv: | $(BIN)/python
	$(BIN)/python -m pip install --quiet uv

# The whole suite runs on the newest Prefect (constraints/prefect-newest.txt); the lowest
# supported one has its own target below.
$(STAMP): pyproject.toml constraints/prefect-newest.txt | $(BIN)/uv
	$(UV_INSTALL) -e '.[dev]' -c constraints/prefect-newest.txt
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The suite runs in worker processes (pytest-xdist), more of them than the 2 cores: most of a
# test's time is a wait (an emulated generation, a Prefect server, a subprocess), not work.
# Tests are handed out as workers free up, the long ones early (tests/conftest.py), so the
# run does not end waiting for a long test started last. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 4
PARALLEL := -n $(TEST_WORKERS) --dist load --maxschedchunk 1

# The whole check: lint, the documentation site and every test in one run: the default suite,
# the wheel installed into a fresh environment (marker install) and the long suites (marker
# slow: the 60-item soak, campaigns killed mid-run and resumed, make ui, make scale).
# Lint and the site build run beside the tests, in the time the test workers spend starting
# their Prefect servers; the check fails if either part does.
test: $(STAMP) system-packages
	@$(MAKE) --no-print-directory -j2 lint docs > .checks.log 2>&1 & checks=$$!; \
	$(BIN)/pytest $(PARALLEL) -m 'slow or install or not slow'; tests=$$?; \
	wait $$checks; checked=$$?; cat .checks.log; rm -f .checks.log; \
	[ $$checked -eq 0 ] || echo "lint or the docs site failed (above)"; \
	[ $$tests -eq 0 ] && [ $$checked -eq 0 ]

# The documentation site (mkdocs.yml) into site/; --strict: a broken link, a missing page or
# an API reference that does not resolve fails the build. CI builds it on every submission.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# A real `prefect server` with its UI on http://127.0.0.1:4200, the emulator, the Blocks, the
# deployments, the example flow and a campaign; prints where each shows, until Ctrl-C.
ui: $(STAMP)
	$(BIN)/python -m tools.showcase

# The same runs, captured by Debian's Chromium through Playwright into docs/images/ui-*.png,
# the pictures the docs show. Not part of `make test`: it installs a browser.
screenshots: $(STAMP)
	@test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)
	$(UV_INSTALL) -e '.[dev,screenshots]' -c constraints/prefect-newest.txt
	$(BIN)/python -m tools.showcase --capture docs/images

# The Prefect-layer tests again on the lowest supported Prefect, in .venv-prefect-lowest
# (pins and their reasons in constraints/prefect-lowest.txt). CI runs it after `make test`.
test-prefect-lowest:
	.ci/test-prefect-lowest $(PARALLEL)

# The demo keeps its Prefect database, results and cache in the checkout, so it neither
# depends on nor alters ~/.prefect (whose database another Prefect version may own).
demo: $(STAMP)
	PREFECT_HOME=$(CURDIR)/.prefect $(BIN)/python -m flows.demo

# 500 items through 25 % injected faults (API, CDN, S3); prints one line, fails if anything is lost.
soak: $(STAMP)
	$(BIN)/python -m reliability.soak --items 500

# The production shape on one machine: a Prefect server on PostgreSQL, Redis, a moto S3 bucket
# (destination and result storage), the emulator, the webhook receiver and two process workers
# with their own Prefect homes; overlapping campaigns, a global concurrency limit, a shared
# budget, a worker killed mid-run and Redis restarted mid-run. Prints one line of counts,
# fails if a guarantee did not hold. A few minutes; `make test` runs a smaller one.
scale: $(STAMP) system-packages
	$(BIN)/python -m tools.scale

# Debian's PostgreSQL and Redis servers, which make bench, make scale and the tests start for
# real (each from a temporary folder, on a free loopback port); installed only where missing.
system-packages:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="postgresql"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing; fi

# Figures as ratios to baselines measured in the same run; writes BENCHMARKS.md, the figure
# table of docs/benchmarks.md and benchmarks/results.json (`python -m benchmarks.run --render`
# re-renders). The N=200 campaign is measured again on PostgreSQL (Debian's package), as
# production servers run. `bench-recheck`: the N=200 and transfer rows only, against the saved
# results, to see whether a change moved them.
bench: $(STAMP) system-packages
	$(BIN)/python -m benchmarks.run

bench-recheck: $(STAMP)
	$(BIN)/python -m benchmarks.recheck

# One campaign under py-spy: how task runs split their wall time (Prefect vs ours).
profile: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m benchmarks.profile_campaign

emulator: $(STAMP)
	$(BIN)/prefect-journey emulator --port 8765

clean:
	rm -rf $(VENV) .venv-prefect-lowest .pytest_cache .mypy_cache .ruff_cache outputs .prefect profile.txt site

# Everything starts from here: on a fresh machine with Python 3.11, `make run` and `make test` do all set-up.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install client2 browser-deps system-deps run test lint format bench bench-artifacts clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (Python >= 3.11 required; set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The stock MLflow 2.x client, for the compatibility tests (tests/integration/test_client_v2.py).
CLIENT2 := .venv-mlflow2
CLIENT2_STAMP := $(CLIENT2)/.installed

client2: $(CLIENT2_STAMP)

$(CLIENT2_STAMP):
	test -x $(CLIENT2)/bin/python || $(PYTHON) -m venv $(CLIENT2)
	$(CLIENT2)/bin/python -m pip install --quiet 'mlflow-skinny>=2.22,<3'
	touch $(CLIENT2_STAMP)

# Chromium for the real-browser UI tests (tests/browser): Debian's package, installed when missing and root.
browser-deps:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else echo "warning: /usr/bin/chromium is missing and cannot be installed (not root or no apt-get): browser tests will skip"; fi

# Servers the tests start themselves: redis-server (shared rate limits). Debian's package, installed when missing.
system-deps: browser-deps
	@if command -v redis-server >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server; \
	else echo "warning: redis-server is missing and cannot be installed (not root or no apt-get): Redis tests will skip"; fi

run: install
	$(BIN)/mlflow-gateway dev

lint: install
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix gateway tests bench
	$(BIN)/ruff format gateway tests bench

test: install client2 system-deps lint
	$(BIN)/python -m pytest

# Benchmarks (bench/README.md, figures in bench/RESULTS.md). `make bench` runs the quick version of each (about
# 13 minutes); the bench-* targets run the full ones, with BENCH_ARGS passed on (e.g. BENCH_ARGS="--rounds 5").
.PHONY: bench-deps bench-passthrough bench-tracking bench-overhead bench-inprocess bench-instructions bench-parts bench-scale

# wrk drives bench/overhead.py, valgrind bench/instructions.py and bench/parts.py: Debian's packages, installed when missing and root
# (like system-deps).
bench-deps:
	@if command -v wrk >/dev/null 2>&1 && command -v callgrind_control >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk valgrind; \
	else echo "error: wrk or valgrind is missing and cannot be installed (not root or no apt-get)"; exit 1; fi

bench: install bench-deps
	$(BIN)/python bench/passthrough.py --quick
	$(BIN)/python bench/tracking.py --quick
	$(BIN)/python bench/overhead.py --quick
	$(BIN)/python bench/inprocess.py --quick
	$(BIN)/python bench/instructions.py --quick
	$(BIN)/python bench/parts.py --quick
	$(BIN)/python bench/scale.py --quick
	$(BIN)/python bench/artifacts.py --quick

bench-passthrough: install
	$(BIN)/python bench/passthrough.py $(BENCH_ARGS)

bench-tracking: install
	$(BIN)/python bench/tracking.py $(BENCH_ARGS)

bench-overhead: install bench-deps
	$(BIN)/python bench/overhead.py $(BENCH_ARGS)

bench-inprocess: install
	$(BIN)/python bench/inprocess.py $(BENCH_ARGS)

bench-instructions: install bench-deps
	$(BIN)/python bench/instructions.py $(BENCH_ARGS)

bench-parts: install bench-deps
	$(BIN)/python bench/parts.py $(BENCH_ARGS)

bench-scale: install
	$(BIN)/python bench/scale.py $(BENCH_ARGS)

bench-artifacts: install
	$(BIN)/python bench/artifacts.py $(BENCH_ARGS)

# Bounded soak test, not part of `make test` (bench/README.md): e.g. make bench-soak SOAK_ARGS="--minutes 10".
.PHONY: bench-soak
bench-soak: install
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(CLIENT2) .gateway-dev .pytest_cache .mypy_cache .ruff_cache

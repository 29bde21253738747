# cachesvc: the two commands are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:8080
ADMIN_LISTEN ?= 127.0.0.1:9090

.PHONY: run test lint bench system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
		{ rm -rf $(VENV) && ./scripts/install-system-deps.sh --venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p data
	$(BIN)/cachesvc serve --origin ./data --listen $(LISTEN) --admin-listen $(ADMIN_LISTEN)

# Debian packages the integration tests and benchmarks talk to (nginx, wrk,
# prometheus/promtool, rclone, docker-compose); installed only when root.
system-deps:
	./scripts/install-system-deps.sh

test: $(STAMP) system-deps
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check cachesvc tests benchmarks
	$(BIN)/ruff format --check cachesvc tests benchmarks
	$(BIN)/mypy --strict cachesvc

# The bench extra: libcachesim for hitratio_bench's simulated policies.
bench: $(STAMP) system-deps
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

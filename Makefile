# VMMem: `make demo` runs the daemons on a real workload; `make test` runs lint, types and tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo up test lint typecheck pytest bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m vmm_agent.load.demo

# The platform daemon and three VMs in the foreground, plus Prometheus with
# deploy/prometheus.yml when it is installed; logs prefixed by process, Ctrl-C stops it all
# (tools/up.py; UP_FLAGS passes options, e.g. UP_FLAGS='--vms 2 --no-prometheus').
UP_FLAGS ?=
up: $(STAMP)
	$(BIN)/python -m tools.up $(UP_FLAGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy shared platform_daemon vmm_agent

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/fault_rtt.py
	$(BIN)/python benchmarks/swap.py
	$(BIN)/python benchmarks/lowprio.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/invariants.py
	$(BIN)/python benchmarks/numa.py
	$(BIN)/python benchmarks/hugepages.py
	$(BIN)/python benchmarks/page_check.py

# Everything VMMem survives, at once, for MINUTES minutes (docs/reliability.md section 9);
# four 32 MiB guests on a 64 MiB host limit (the CI version, tests/test_soak.py, is shorter
# and smaller).
MINUTES ?= 5
SOAK_FLAGS ?= --agents 4 --memory 32
soak: $(STAMP)
	$(BIN)/python -m tools.soak --minutes $(MINUTES) $(SOAK_FLAGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

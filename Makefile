# The two set-up commands of the README: `make demo` (main job) and `make test` (the test suite).
# Both install the package first; torch is pinned to 2.13.0 by constraints.txt (the local CPU wheel).
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install demo test test-all lint bench

install:
	$(PIP_INSTALL) -e ".[test]"

demo: install
	$(PYTHON) -m experiments.demo

test: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m ruff check .
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q

test-all: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "slow or not slow"

bench: install
	$(PYTHON) -m benchmarks.bench_simulator
	$(PYTHON) -m benchmarks.bench_merge

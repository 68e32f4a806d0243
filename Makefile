# ravenp2p: everything a newcomer or CI needs, from a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench lint clean contracts

install: $(STAMP)

$(STAMP): pyproject.toml package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@if [ -f package.json ]; then npm ci --no-audit --no-fund --ignore-scripts; fi
	touch $(STAMP)

demo: install
	$(VENV)/bin/ravenp2p devnet --nodes 5 --byzantine 1

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

bench: install
	$(PY) benchmarks/net.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/chain.py
	$(PY) benchmarks/demo.py
	$(PY) benchmarks/sim_scale.py

contracts: install
	node contracts/build.js

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) node_modules .pytest_cache .ruff_cache .mypy_cache

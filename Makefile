# Thin layer over the `bottleneck` command. Every target installs what it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= cpu,test

DATA ?= data
CACHE ?= cache
ARGS ?=

.PHONY: install test features bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

features: $(STAMP)
	$(BIN)/bottleneck features $(DATA) --cache $(CACHE) $(ARGS)

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

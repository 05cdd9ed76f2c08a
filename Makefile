# Every target installs the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= conf/default.yaml
PORT ?= 8080
STAMP := $(VENV)/.installed
# Study of the default config, whose best.yaml `make train` refits.
STUDY ?= pneumonia-default

.PHONY: install sweep test report export dashboard weights train lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

weights: $(STAMP)
	$(BIN)/sweep weights

sweep: weights
	$(BIN)/sweep run $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest

report: $(STAMP)
	$(BIN)/sweep report $(CONFIG)

export: $(STAMP)
	$(BIN)/sweep export $(CONFIG)

dashboard: $(STAMP)
	$(BIN)/sweep dashboard $(CONFIG) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check sweep tests
	$(BIN)/mypy sweep

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

train: $(STAMP)
	$(BIN)/sweep train studies/$(STUDY)/best.yaml

bench: $(STAMP) weights
	$(BIN)/python benchmarks/bench_sweep.py

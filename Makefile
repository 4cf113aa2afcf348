# Two commands for a newcomer: `make run` and `make test`. Everything else is a helper of those.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
CHECKOV_VENV := .venv-checkov
NODE_MODULES := devtools/node_modules

.PHONY: run test lint format bench setup setup-test unit clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(CHECKOV_VENV)/.installed: devtools/requirements-checkov.txt
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --disable-pip-version-check -r devtools/requirements-checkov.txt
	touch $@

$(NODE_MODULES)/.installed: devtools/package.json
	cd devtools && npm install --no-audit --no-fund --loglevel=error
	touch $@

setup: $(VENV)/.installed $(NODE_MODULES)/.installed

# Browser tests drive Debian's Chromium; install it when missing (needs root, as on CI).
/usr/bin/chromium:
	@if [ "$$(id -u)" = "0" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "Chromium is missing: run 'sudo apt-get install chromium'"; exit 1; fi

setup-test: setup $(CHECKOV_VENV)/.installed /usr/bin/chromium

run: setup
	$(PY) -m devtools.run_local $(if $(FRESH),--fresh)

# Lint, formatting and types first: they are part of the test command, so CI enforces them.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: setup-test lint
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest tests/unit

bench: setup
	$(PY) -m devtools.bench

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(NODE_MODULES) .pytest_cache test-artifacts

# Development entry points. Everything installs from this repo into .venv.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

# A demo project and token so that `make run` works out of the box; set your own in production.
export CALLPIPE_TOKENS ?= demo:demo-token

.PHONY: install services run test lint sample schemas clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

# The official AsyncAPI parser, for tests/unit/test_asyncapi.py (needs Node.js 20+).
tests/asyncapi/node_modules/.installed: tests/asyncapi/package.json tests/asyncapi/package-lock.json
	npm ci --prefix tests/asyncapi --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $@

install: $(BIN)/.installed tests/asyncapi/node_modules/.installed

services:
	scripts/ensure-services

## Run the whole pipeline (ingress on :8080, both workers, the sinks of CALLPIPE_SINKS_FILE)
## against local RabbitMQ/PostgreSQL. Needs no Node.js: that is for the tests only.
run: $(BIN)/.installed services
	$(BIN)/callpipe setup
	$(BIN)/callpipe run

## Run the test suite against real RabbitMQ and PostgreSQL.
test: install services
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

## Post 20 sample calls to the pipeline `make run` started.
sample: $(BIN)/.installed
	$(BIN)/callpipe send-sample --url http://127.0.0.1:8080/roistat/demo-token --calls 20

schemas: install
	$(BIN)/python -m schemas.jsonschema

clean:
	rm -rf $(VENV) tests/asyncapi/node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info

# The README's two commands: `make demo` (the main job) and `make test` (the tests).
# Each sets up everything it needs on a fresh machine: a virtualenv with the project,
# the Kafka jars (deploy/kafka/kafka.sh fetch), and promtool for the alert-rule tests.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-console test lint typecheck unit bench soak screenshots kafka-fetch tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

kafka-fetch:
	deploy/kafka/kafka.sh fetch

tools:
	deploy/install-tools.sh

demo: $(STAMP) kafka-fetch
	$(BIN)/perkamo-webhooks demo

# The demo, then the consumer keeps serving the console (and resends) until Ctrl+C.
demo-console: $(STAMP) kafka-fetch
	$(BIN)/perkamo-webhooks demo --console

lint: $(STAMP)
	$(BIN)/ruff check consumer tests
	$(BIN)/mypy

test: $(STAMP) kafka-fetch tools lint
	$(BIN)/python -m pytest -q -ra

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# The console's browser tests, saving a screenshot of each page into docs/console.
screenshots: $(STAMP) kafka-fetch tools
	PERKAMO_SCREENSHOTS_DIR=docs/console $(BIN)/python -m pytest -q tests/test_console_browser.py

bench: $(STAMP) kafka-fetch
	$(BIN)/python -m tests.bench

soak: $(STAMP) kafka-fetch
	$(BIN)/python -m tests.faults.soak

clean:
	rm -rf $(VENV) .data .cache .pytest_cache .mypy_cache .ruff_cache

# NANN: set-up, demo and tests. Every target creates .venv with the pinned requirements if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := runs/demo

.PHONY: setup demo test test-fast lint clean-demo image image-check stack stack-check

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-server.txt requirements-loadtest.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# End to end through the real server on the embedded default (no external service): builds a
# model on a synthetic corpus of about 40k items if none exists (synthesize -> train -> index -> export ->
# beam evaluation -> feature snapshot), starts `python -m server` on a free loopback port, calls
# Retrieve for a few users, shows a new behaviour change the answer, stops the server.
demo: setup
	$(BIN)/python scripts/demo.py --root $(DEMO)

test: setup
	$(BIN)/python -m pytest -q --durations=15

# The inner loop: everything but the slow end-to-end checks (marked e2e).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not e2e" --durations=10

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Container images (runtime; TARGETS="runtime loadtest trainer" for all), with a debootstrap base
# where no base image can be pulled; then run one with a model mounted: make image-check W=runs/demo/work
image:
	scripts/image.sh

image-check: setup
	scripts/image_check.sh $(or $(W),$(DEMO)/work)

# The monitoring stack without containers on the demo model: Redis store, a real Prometheus, locust.
stack: setup
	$(BIN)/python -m loadtest.stack --workdir $(DEMO)/work --out runs/stack

# docker-compose up as a repeatable check (slow, not in the tests): images, stand-ins for redis and
# prometheus where they cannot be pulled, the compose stack, the Redis path, Prometheus, locust and a
# hot reload under load; down -v at the end. Results: benchmarks/results/stack_check.txt
stack-check: setup
	scripts/stack_check.sh

clean-demo:
	rm -rf $(DEMO)

# NANN: set-up, demo and tests. Every target creates .venv with the pinned requirements if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := runs/demo

.PHONY: setup demo test lint clean-demo

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-server.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# End to end on a small synthetic corpus: synthesize -> train (din + FGSM) -> exhaustive evaluation
# -> HNSW index -> SavedModel export -> Beam-retrieval measured against the exhaustive answer.
demo: setup
	$(BIN)/python -m model_export synthesize --items 5000 --users 2000 --mean-length 30 --out $(DEMO)/interactions.csv
	$(BIN)/python -m model_export train --interactions $(DEMO)/interactions.csv --workdir $(DEMO)/work --epochs 1 --restart
	$(BIN)/python -m model_export evaluate --workdir $(DEMO)/work --k 200
	$(BIN)/python -m index_builder --workdir $(DEMO)/work
	$(BIN)/python -m model_export export --workdir $(DEMO)/work
	$(BIN)/python -m model_export evaluate --workdir $(DEMO)/work --k 200 --mode beam

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-demo:
	rm -rf $(DEMO)

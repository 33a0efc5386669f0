# kvship: `make demo` and `make test` each set up .venv on a fresh machine themselves.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.kvship-installed

.PHONY: demo test lint bench vectors clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvship demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python tools/make_vectors.py --check
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/kvship bench --repeat 3 --json

vectors: $(STAMP)
	$(BIN)/python tools/make_vectors.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build *.egg-info

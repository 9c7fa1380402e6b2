# The two set-up commands of the README. Both create .venv from requirements.txt when it is missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/ckptflow: requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

demo: $(BIN)/ckptflow
	$(BIN)/python scripts/demo.py

test: $(BIN)/ckptflow
	$(BIN)/python -m pytest

bench: $(BIN)/ckptflow
	$(BIN)/python bench/convert_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

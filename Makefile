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
	$(BIN)/python scripts/demo.py $(if $(MODE),--mode $(MODE))

# Airflow's OpenLineage listener forks worker processes; run those tests in a pytest process that has
# not loaded JAX (forking a process with JAX's threads alive can deadlock the child).
# The Kubernetes API stand-in's own tests drive the cncf.kubernetes provider in-process: they run with the Airflow
# suites (one process that imports Airflow while collecting), not in an xdist worker where Airflow's logging would
# first be set up inside a test's captured stdout and break every later test of that worker.
AIRFLOW_TESTS := tests/dags tests/operators $(wildcard tests/plugins) tests/stand_ins/test_kube_api.py

# The converter tests run in two worker processes (pytest-xdist), one test file per worker at a time so that a
# file's cached models are built once: the serial run used a little over one of the two cores.
TEST_WORKERS ?= 2

test: $(BIN)/ckptflow
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(addprefix --ignore=,$(AIRFLOW_TESTS))
	$(BIN)/python -m pytest $(AIRFLOW_TESTS)

bench: $(BIN)/ckptflow
	$(BIN)/python bench/convert_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

"""Pytest fixtures shared by the Airflow test suites (tests/operators, tests/dags): import them in a conftest.

Importing this module points Airflow at a throwaway home (SQLite, LocalExecutor, OpenLineage events to a
file), so the conftest must import it before anything imports Airflow.
"""

from __future__ import annotations

import pytest

from operators.embedded import DAGS_FOLDER, migrate, session_home

AIRFLOW_HOME = session_home()


@pytest.fixture(scope="session")
def airflow_db():
    """The migrated metadata database of the session's Airflow home; returns the home folder."""
    migrate()
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def convert_dag(airflow_db):
    """`convert_checkpoint` as the DAG processor loads it from the DAG folder."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert not bag.import_errors, bag.import_errors
    return bag.get_dag("convert_checkpoint")


@pytest.fixture
def isolated_runs(convert_dag):
    """`convert_dag` for tests that call `dag.test()`, with the DAG's param values put back afterwards.

    In-process runs resolve each run's conf into the tasks' own `Param` objects (Airflow's `process_params`), so
    otherwise one test's `parts` or `execution_mode` would be the next test's default.
    """
    holders = [convert_dag, *convert_dag.tasks]
    saved = [(h.params.get_param(k), h.params.get_param(k).value) for h in holders for k in h.params]
    yield convert_dag
    for param, value in saved:
        param.value = value

"""Airflow suites run against a throwaway Airflow home, set up before Airflow is imported."""

from tests.airflow_fixtures import airflow_db, convert_dag, isolated_runs  # noqa: F401  (fixtures)

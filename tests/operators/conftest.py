"""Airflow suites run against a throwaway Airflow home, set up before Airflow is imported."""

from operators.testing import airflow_db, convert_dag  # noqa: F401  (fixtures)

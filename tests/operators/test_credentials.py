"""Credentials reach only the steps that talk to the hub or object storage, from Airflow connections."""

from __future__ import annotations

import json

from operators.ckptflow_operators import OPERATORS, DownloadFinalizeOperator, FinalizeOperator

ALL_OPERATORS = {**OPERATORS, "download_finalize": DownloadFinalizeOperator, "finalize": FinalizeOperator}


def test_gcp_connection_sets_key_file_and_project_for_download_and_publish_only(monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW_CONN_CKPTFLOW_GCP",
        json.dumps(
            {
                "conn_type": "google_cloud_platform",
                "extra": {"key_path": "/secrets/gcs-key.json", "project": "my-project"},
            }
        ),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_CKPTFLOW_HF", json.dumps({"conn_type": "generic", "password": "hf_fromTheConnection"})
    )
    monkeypatch.setenv("HF_TOKEN", "hf_inTheWorkersEnvironment")
    envs = {step: op(task_id=step)._child_env() for step, op in ALL_OPERATORS.items()}
    for step, env in envs.items():
        hub = step in ("download", "download_finalize", "publish")  # a split download's finalize fetches files too
        want = ("/secrets/gcs-key.json", "my-project") if hub else (None, None)
        assert (env.get("GOOGLE_APPLICATION_CREDENTIALS"), env.get("GOOGLE_CLOUD_PROJECT")) == want, step
        assert env.get("HF_TOKEN") == ("hf_fromTheConnection" if hub else None), step
        assert not any(k.startswith("AIRFLOW_CONN_") for k in env)


def test_no_gcp_connection_leaves_application_default_credentials(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_CKPTFLOW_GCP", raising=False)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in OPERATORS["publish"](task_id="publish")._child_env()

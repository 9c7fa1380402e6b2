"""DAG params that try traversal, shell metacharacters or unsupported URI schemes are rejected before anything
runs: by the Param schemas when a run is triggered (UI, REST API, CLI), and again by `RunSpec` when a task
plans its command (a run created any other way)."""

from __future__ import annotations

import pytest

from operators.commands import RunSpec

GOOD = {"source": "acme/tiny", "destination": "file:///models/tiny/v1"}

BAD = [
    # traversal
    ("source", "/data/models/../../etc"),
    ("source", "file:///data/../etc/passwd"),
    ("source", "acme/.."),
    ("source", "../acme/tiny"),
    ("destination", "file:///models/../../root/.ssh"),
    ("destination", "file:///models/tiny/.."),
    ("revision", "main/../../x"),
    # shell metacharacters, quotes, whitespace, newlines
    ("source", "/data/$(reboot)"),
    ("source", "/data/`id`"),
    ("source", "/data/x;rm"),
    ("source", "/data/x|cat"),
    ("source", "/data/x&&id"),
    ("source", "/data/x>out"),
    ("source", "/data/'x'"),
    ("source", "acme/tiny\n"),
    ("source", "acme/tiny --revision x"),
    ("destination", "file:///models/$HOME"),
    ("destination", "file:///models/x;id"),
    ("destination", "file:///models/tiny\n"),
    ("revision", "main;id"),
    ("revision", "$(id)"),
    ("revision", "-rf"),
    ("revision", "main\n"),
    # URI schemes ckptflow does not read or write, and relative or host-qualified file URIs
    ("source", "http://example.com/model"),
    ("source", "s3://bucket/model"),
    ("source", "gs://bucket/model"),
    ("source", "ssh://host/model"),
    ("source", "file://relative/path"),
    ("destination", "s3://bucket/tiny"),
    ("destination", "http://example.com/upload"),
    ("destination", "ftp://host/x"),
    ("destination", "javascript:alert(1)"),
    ("destination", "file://host/models/tiny"),
    ("destination", "file:relative"),
]


@pytest.mark.parametrize("param, value", BAD)
def test_unsafe_params_are_rejected_when_triggered(convert_dag, param, value):
    from airflow.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    served = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(convert_dag))
    with pytest.raises(ParamValidationError) as err:
        served.params.deep_merge({**GOOD, param: value}).validate()
    assert str(err.value).startswith(f"Invalid input for param {param}:")


@pytest.mark.parametrize("param, value", BAD)
def test_unsafe_params_are_rejected_by_the_run_spec(param, value):
    with pytest.raises(ValueError, match=param):
        RunSpec(**{**GOOD, param: value})


@pytest.mark.parametrize(
    "param, value",
    [
        ("source", "/data/models/Qwen3-0.6B"),
        ("source", "file:///data/maxtext/run-7/checkpoints"),
        ("source", "meta-llama/Llama-3.1-8B"),
        ("source", "/data/v1.2+build@host,a=b:c"),
        ("destination", "file:///models/llama3.1-8b/maxtext-scanned-bf16"),
        ("revision", "v1.0"),
        ("revision", "refs/pr/1"),
        ("revision", "0123456789abcdef0123456789abcdef01234567"),
    ],
)
def test_ordinary_values_still_pass(convert_dag, param, value):
    from airflow.serialization.serialized_objects import DagSerialization

    served = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(convert_dag))
    served.params.deep_merge({**GOOD, param: value}).validate()
    RunSpec(**{**GOOD, param: value})


def test_a_run_with_unsafe_params_never_starts_a_command(convert_dag, tmp_path, monkeypatch):
    """Even past the form (a run created with unchecked conf): the task fails while planning, before any command."""
    from airflow.sdk.exceptions import AirflowFailException

    from operators import commands

    started = []
    monkeypatch.setattr(commands, "local_entrypoint", lambda: started.append(1) or ["false"])
    op = convert_dag.get_task("verify")  # (download and convert are mapped over the run's parts)

    class Dag:
        dag_id = "convert_checkpoint"

    context = {"params": {**GOOD, "source": "/data/../etc"}, "dag": Dag(), "run_id": "manual__x", "outlet_events": {}}
    with pytest.raises(AirflowFailException, match="invalid parameters for verify: source"):
        op.execute(context)
    assert started == [] and not list(tmp_path.iterdir())

"""The `ckptflow` arguments of each step, the run spec and the work layout (no Airflow involved)."""

from __future__ import annotations

import sys

import pytest

from converters.cli.main import build_parser
from operators import commands
from operators.commands import RunSpec, WorkLayout, run_key, step_args

LAYOUT = WorkLayout("/work/convert_checkpoint/run-1")


def test_hf_to_maxtext_commands():
    spec = RunSpec(
        source="acme/tiny",
        revision="v2",
        destination="file:///models/tiny/v1",
        model="qwen3-0.6b",
        scan=False,
        dtype="float32",
        max_kl=0.02,
    )
    assert step_args("download", spec, LAYOUT) == [
        "download",
        "acme/tiny",
        "/work/convert_checkpoint/run-1/source",
        "--revision",
        "v2",
    ]
    assert step_args("convert", spec, LAYOUT) == [
        "convert",
        "/work/convert_checkpoint/run-1/source",
        "/work/convert_checkpoint/run-1/converted",
        "--to",
        "maxtext",
        "--no-scan",
        "--dtype",
        "float32",
        "--model",
        "qwen3-0.6b",
        "--overwrite",
        "--quiet",
    ]
    assert step_args("verify", spec, LAYOUT) == [
        "verify",
        "--hf",
        "/work/convert_checkpoint/run-1/source",
        "--maxtext",
        "/work/convert_checkpoint/run-1/converted",
        "--max-kl",
        "0.02",
        "--report",
        "/work/convert_checkpoint/run-1/verify",
    ]
    assert step_args("publish", spec, LAYOUT) == [
        "publish",
        "/work/convert_checkpoint/run-1/converted",
        "file:///models/tiny/v1",
        "--receipt",
        "/work/convert_checkpoint/run-1/publish.json",
        "--verify-report",
        "/work/convert_checkpoint/run-1/verify/verify.json",
    ]


def test_maxtext_to_hf_swaps_the_verify_sides_and_stages_a_checkpoint():
    spec = RunSpec(source="/ckpts/run7", destination="file:///models/hf", direction="maxtext-to-hf")
    assert step_args("download", spec, LAYOUT) == [
        "download",
        "/ckpts/run7",
        "/work/convert_checkpoint/run-1/source",
        "--format",
        "maxtext",
    ]
    assert step_args("convert", spec, LAYOUT)[3:5] == ["--to", "hf"]
    verify = step_args("verify", spec, LAYOUT)
    assert verify[verify.index("--hf") + 1].endswith("/converted") and verify[verify.index("--maxtext") + 1].endswith(
        "/source"
    )


def test_local_sources_get_no_revision_and_auto_model_no_flag():
    spec = RunSpec(source="file:///data/tiny", destination="file:///x")
    assert "--revision" not in step_args("download", spec, LAYOUT)
    assert "--model" not in step_args("convert", spec, LAYOUT)


def test_every_command_parses_with_the_real_cli():
    parser = build_parser()
    for spec in (
        RunSpec(source="acme/tiny", destination="file:///x", model="llama3.1-8b"),
        RunSpec(source="/ckpt", destination="file:///y", direction="maxtext-to-hf", scan=False),
    ):
        for step in commands.STEPS:
            args = parser.parse_args(step_args(step, spec, LAYOUT))
            assert args.command == step


@pytest.mark.parametrize(
    "params, message",
    [
        ({"direction": "sideways"}, "direction must be one of"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"max_kl": 0}, "max_kl must be a positive number"),
        ({"max_kl": True}, "max_kl must be a positive number"),
        ({"execution_mode": "ssh"}, "execution_mode must be one of"),
        ({"destination": ""}, "source and destination are required"),
    ],
)
def test_run_spec_rejects_bad_values(params, message):
    with pytest.raises(ValueError, match=message):
        RunSpec.from_params({"source": "acme/tiny", "destination": "file:///x", **params})


def test_run_spec_from_params_ignores_unknown_keys_and_applies_task_overrides():
    spec = RunSpec.from_params(
        {"source": "acme/tiny", "destination": "file:///x", "unrelated": 1, "execution_mode": "kubernetes"},
        execution_mode="local",
        node_pool=None,
    )
    assert spec.execution_mode == "local" and spec.node_pool == commands.DEFAULT_NODE_POOL


def test_run_keys_are_safe_and_distinct():
    a, b = run_key("d", "manual__2026-11-29T12:00:00+00:00"), run_key("d", "manual__2026-11-29T12_00_00_00_00")
    assert a != b and a.startswith("d/manual__2026-11-29T12_00_00_00_00-")
    assert run_key("d", "../../etc").startswith("d/etc-")
    assert "/" not in run_key("d", "a/b/c").removeprefix("d/")


def test_local_entrypoint_is_this_interpreter_unless_overridden(monkeypatch):
    monkeypatch.delenv("CKPTFLOW_CLI", raising=False)
    assert commands.local_entrypoint() == [sys.executable, "-m", "converters"]
    monkeypatch.setenv("CKPTFLOW_CLI", "/opt/ckptflow/bin/ckptflow --verbose")
    assert commands.local_entrypoint() == ["/opt/ckptflow/bin/ckptflow", "--verbose"]


PARTS_SPEC = RunSpec(source="acme/tiny", destination="file:///x", model="llama3.1-8b", scan=False, parts=3)


def test_convert_in_parts_runs_one_command_per_part_and_a_finalize_with_the_same_conversion():
    whole = step_args(
        "convert", RunSpec(source="acme/tiny", destination="file:///x", model="llama3.1-8b", scan=False), LAYOUT
    )
    parts = [step_args("convert", PARTS_SPEC, LAYOUT, part=i) for i in range(3)]
    assert parts == [whole + ["--part", f"{i}/3"] for i in range(3)]  # same SRC, OUT and options for every part
    assert step_args("finalize", PARTS_SPEC, LAYOUT) == whole + ["--finalize"]
    # One part is the whole conversion: the single-process command, as before `parts` existed.
    one = RunSpec(source="acme/tiny", destination="file:///x", model="llama3.1-8b", scan=False, parts=1)
    assert step_args("convert", one, LAYOUT, part=0) == step_args("convert", one, LAYOUT) == whole
    with pytest.raises(ValueError, match="nothing to finalize"):
        step_args("finalize", one, LAYOUT)
    # Verify and publish do not depend on the number of parts.
    for step in ("verify", "publish"):
        assert step_args(step, PARTS_SPEC, LAYOUT) == step_args(step, one, LAYOUT)
    assert LAYOUT.parts_staging_dir == "/work/convert_checkpoint/run-1/.converted.ckptflow-parts"


@pytest.mark.parametrize("source, revision", [("acme/tiny", "v2"), ("/data/tiny", None)])
def test_download_in_parts_runs_one_command_per_part_and_a_finalize_with_the_same_source(source, revision):
    one = RunSpec(source=source, revision=revision, destination="file:///x", parts=1)
    whole = step_args("download", one, LAYOUT)
    assert whole == [
        "download",
        source,
        "/work/convert_checkpoint/run-1/source",
        *(["--revision", revision] if revision else []),
    ]
    spec = RunSpec(source=source, revision=revision, destination="file:///x", parts=3)
    # Same SOURCE, OUT and revision for every part and the finalize (a local source's parts do nothing).
    assert [step_args("download", spec, LAYOUT, part=i) for i in range(3)] == [
        whole + ["--part", f"{i}/3"] for i in range(3)
    ]
    assert step_args("download_finalize", spec, LAYOUT) == whole + ["--finalize"]
    # One part is the whole download: the single-process command, as before `parts` existed.
    assert step_args("download", one, LAYOUT, part=0) == whole
    with pytest.raises(ValueError, match="nothing to finalize"):
        step_args("download_finalize", one, LAYOUT)


def test_a_maxtext_source_downloads_in_parts_with_its_format():
    spec = RunSpec(source="/ckpts/run7", destination="file:///models/hf", direction="maxtext-to-hf", parts=2)
    assert step_args("download", spec, LAYOUT, part=1)[3:] == ["--format", "maxtext", "--part", "1/2"]
    assert step_args("download_finalize", spec, LAYOUT)[3:] == ["--format", "maxtext", "--finalize"]


@pytest.mark.parametrize("step", ["convert", "download"])
@pytest.mark.parametrize("part", [None, -1, 3, "1", True])
def test_a_part_index_outside_the_run_is_refused(step, part):
    with pytest.raises(ValueError, match="part index from 0 to 2"):
        step_args(step, PARTS_SPEC, LAYOUT, part=part)


@pytest.mark.parametrize("parts", [0, -1, 2.5, "3", True, commands.MAX_PARTS + 1, None])
def test_run_spec_rejects_bad_parts(parts):
    with pytest.raises(ValueError, match="parts must be a whole number"):
        RunSpec.from_params({"source": "acme/tiny", "destination": "file:///x", "parts": parts})


def test_run_spec_parts_default_and_json_integers():
    assert RunSpec.from_params({"source": "acme/tiny", "destination": "file:///x"}).parts == 1
    assert RunSpec.from_params({"source": "acme/tiny", "destination": "file:///x", "parts": 4.0}).parts == 4  # JSON 4.0


def test_part_and_finalize_commands_parse_with_the_real_cli():
    parser = build_parser()
    for spec in (PARTS_SPEC, RunSpec(source="/ckpt", destination="file:///y", direction="maxtext-to-hf", parts=2)):
        for step, finalize in (("download", "download_finalize"), ("convert", "finalize")):
            parts = [parser.parse_args(step_args(step, spec, LAYOUT, part=i)) for i in range(spec.parts)]
            assert [(a.command, a.part, a.finalize) for a in parts] == [
                (step, (i, spec.parts), False) for i in range(spec.parts)
            ]
            done = parser.parse_args(step_args(finalize, spec, LAYOUT))
            assert (done.command, done.part, done.finalize) == (step, None, True)

"""The step operators inside real Airflow runs (dag.test, SQLite), with a stand-in `ckptflow` (fast).

Retries, the verify gate, non-retryable bad input, credentials, the commands actually run, and download and
convert split into mapped parts (one task instance each, retried alone), each followed by its finalize.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from operators import commands
from operators.commands import DOWNLOAD_FINALIZE, FINALIZE, STEPS, RunSpec, WorkLayout, step_args
from operators.embedded import ol_events

FAKE = Path(__file__).with_name("fake_ckptflow.py")


@pytest.fixture
def fake_cli(tmp_path, monkeypatch):
    """Route every step to the stand-in (the one function the operators take their program from)."""
    state = tmp_path / "fake-state"
    monkeypatch.setattr(commands, "local_entrypoint", lambda: [sys.executable, str(FAKE)])
    monkeypatch.setenv("FAKE_CKPTFLOW_STATE", str(state))
    monkeypatch.setenv("CKPTFLOW_WORK_ROOT", str(tmp_path / "work"))
    for var in ("FAKE_CKPTFLOW_FAIL_ONCE", "FAKE_CKPTFLOW_VERIFY", "FAKE_CKPTFLOW_EXIT"):
        monkeypatch.delenv(var, raising=False)

    def calls():
        path = state / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return calls


@pytest.fixture
def fast_retries(isolated_runs):
    """Keep the operators' retry policy (count, exponential backoff) but start from a 0 s delay (waits 1-2 s)."""
    convert_dag = isolated_runs
    saved = {t.task_id: t.retry_delay for t in convert_dag.tasks}
    for t in convert_dag.tasks:
        t.retry_delay = timedelta(0)
    yield convert_dag
    for t in convert_dag.tasks:
        t.retry_delay = saved[t.task_id]


def run(dag, conf):
    dr = dag.test(run_conf=conf)
    return dr, {ti.task_id: ti for ti in dr.get_task_instances()}


def run_mapped(dag, conf):
    """Like `run`, keyed by (task_id, map_index): the parts are task instances of one mapped task."""
    dr = dag.test(run_conf=conf)
    return dr, {(ti.task_id, ti.map_index): ti for ti in dr.get_task_instances()}


CONF = {"source": "acme/tiny", "revision": "v1.0", "destination": "file:///tmp/ckptflow-test-dest/never-written"}


def test_defaults_every_step_retries_with_backoff_and_a_timeout(convert_dag):
    steps = [t for t in convert_dag.tasks if t.task_id != "plan_parts"]  # plan_parts only lists indices
    assert sorted(t.task_id for t in steps) == sorted((*STEPS, DOWNLOAD_FINALIZE, FINALIZE))
    for task in steps:  # the mapped download and convert too: their retries come from the partial arguments
        assert task.retries >= 3 and task.retry_exponential_backoff > 1, task.task_id
        assert task.max_retry_delay and task.execution_timeout, task.task_id
    assert convert_dag.get_task("convert").execution_timeout == timedelta(hours=6)
    assert convert_dag.get_task("download").execution_timeout == timedelta(hours=3)
    for task_id in ("publish", "finalize", DOWNLOAD_FINALIZE):
        assert convert_dag.get_task(task_id).trigger_rule == "all_success"
    order = [t.task_id for t in convert_dag.topological_sort()]
    assert [t for t in order if t in STEPS] == list(STEPS) and order.index("finalize") == order.index("convert") + 1
    assert order.index(DOWNLOAD_FINALIZE) == order.index("download") + 1 == order.index("convert") - 1


def test_a_step_failing_once_is_retried_and_the_run_succeeds(fast_retries, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_CKPTFLOW_FAIL_ONCE", "convert")
    dr, tis = run(fast_retries, CONF)
    assert dr.state == "success"
    assert {k: ti.try_number for k, ti in tis.items()} == {
        "download": 1,
        "download_finalize": 1,
        "plan_parts": 1,
        "convert": 2,
        "finalize": 1,
        "verify": 1,
        "publish": 1,
    }
    assert (
        tis["finalize"].state == tis["download_finalize"].state == "success"
    )  # one part: the finalizes run no command
    argvs = [c["argv"] for c in fake_cli()]
    assert [a[0] for a in argvs] == ["download", "convert", "convert", "verify", "publish"]
    assert argvs[1] == argvs[2]  # a retry runs exactly the same command
    # The commands are the ones `step_args` derives, under the run's work folder.
    layout = WorkLayout(str(Path(argvs[0][2]).parent))
    spec = RunSpec.from_params({**CONF})
    assert [a for a in argvs if a is not argvs[2]] == [step_args(s, spec, layout) for s in STEPS]
    assert argvs[0][-2:] == ["--revision", "v1.0"]
    # No Airflow settings leak into the child processes.
    assert all(c["airflow_env"] == [] for c in fake_cli())


def test_a_failing_verify_stops_publish_without_retrying(fast_retries, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_CKPTFLOW_VERIFY", "fail")
    dr, tis = run(fast_retries, CONF)
    assert dr.state == "failed"
    assert tis["verify"].state == "failed" and tis["verify"].try_number == 1  # a KL verdict is not retried
    assert tis["publish"].state == "upstream_failed"
    assert "publish" not in [c["argv"][0] for c in fake_cli()]


def test_execution_timeout_kills_the_command(fast_retries, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_CKPTFLOW_HANG", "download")
    task = fast_retries.get_task("download")
    monkeypatch.setattr(task, "execution_timeout", timedelta(seconds=3))
    monkeypatch.setattr(task, "retries", 0)
    dr, tis = run(fast_retries, CONF)
    assert dr.state == "failed" and tis["download"].state == "failed"
    (call,) = fake_cli()
    with pytest.raises(ProcessLookupError):
        os.kill(call["pid"], 0)  # the hanging command is gone, not orphaned


def test_bad_input_is_not_retried(fast_retries, fake_cli, monkeypatch):
    monkeypatch.setenv("FAKE_CKPTFLOW_EXIT", "download:2")
    dr, tis = run(fast_retries, CONF)
    assert dr.state == "failed"
    assert tis["download"].state == "failed" and tis["download"].try_number == 1
    assert [c["argv"][0] for c in fake_cli()] == ["download"]


def test_hub_source_token_from_a_connection_and_lineage_pinned_to_the_sha(fast_retries, fake_cli, monkeypatch):
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    secret = "hf_SECRETtoken123456"
    monkeypatch.setenv("AIRFLOW_CONN_CKPTFLOW_HF", json.dumps({"conn_type": "generic", "password": secret}))
    dr, _ = run(fast_retries, CONF)
    assert dr.state == "success"
    tokens = {c["argv"][0]: c["hf_token"] for c in fake_cli()}
    assert tokens == {"download": secret, "convert": None, "verify": None, "publish": secret}
    assert all(secret not in " ".join(c["argv"]) for c in fake_cli())

    with create_session() as session:
        extras = {
            e.source_task_id: e.extra for e in session.query(AssetEvent).filter(AssetEvent.source_run_id == dr.run_id)
        }
    assert extras["publish"]["source_revision"] == "v1.0" and extras["publish"]["source_revision_sha"] == "f" * 40
    assert secret not in json.dumps(extras)
    # OpenLineage names the source by the resolved commit, not by "v1.0".
    home = Path(os.environ["AIRFLOW_HOME"])
    (done,) = [
        e
        for e in ol_events(home)
        if e["eventType"] == "COMPLETE"
        and e["job"]["name"].endswith(".download")
        and e["run"]["facets"]["airflow"]["dagRun"]["run_id"] == dr.run_id
    ]
    (source,) = done["inputs"]
    assert (source["namespace"], source["name"]) == ("https://huggingface.co", "acme/tiny")
    assert source["facets"]["version"]["datasetVersion"] == "f" * 40


# --------------------------------------------------------------------------- download and convert in parts

PARTS_CONF = {**CONF, "parts": 3}


def part_of(argv):
    """ "convert 0/3" for a part's command, "convert --finalize" for a finalize, else the subcommand."""
    if "--part" in argv:
        return f"{argv[0]} {argv[argv.index('--part') + 1]}"
    return f"{argv[0]} --finalize" if "--finalize" in argv else argv[0]


def test_download_and_convert_in_three_parts_map_one_task_instance_per_part(fast_retries, fake_cli):
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    dr, tis = run_mapped(fast_retries, PARTS_CONF)
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    for step in ("download", "convert"):
        parts = {i: ti for (task_id, i), ti in tis.items() if task_id == step}
        assert sorted(parts) == [0, 1, 2] and all(ti.try_number == 1 for ti in parts.values()), step
        assert {i: ti.rendered_map_index for i, ti in parts.items()} == {i: f"part {i}/3" for i in range(3)}, step

    calls = fake_cli()
    order = [part_of(c["argv"]) for c in calls]
    assert sorted(order[0:3]) == ["download 0/3", "download 1/3", "download 2/3"] and order[3] == "download --finalize"
    assert sorted(order[4:7]) == ["convert 0/3", "convert 1/3", "convert 2/3"]
    assert order[7:] == ["convert --finalize", "verify", "publish"]
    for parts in (calls[0:3], calls[4:7]):
        assert len({c["pid"] for c in parts}) == 3  # each part in a process of its own
    layout = WorkLayout(str(Path(calls[0]["argv"][2]).parent))
    spec = RunSpec.from_params(PARTS_CONF)
    by_part = {part_of(c["argv"]): c["argv"] for c in calls}
    for i in range(3):
        assert by_part[f"download {i}/3"] == step_args("download", spec, layout, part=i)
        assert by_part[f"convert {i}/3"] == step_args("convert", spec, layout, part=i)
    assert by_part["download --finalize"] == step_args(DOWNLOAD_FINALIZE, spec, layout)
    assert by_part["download --finalize"][-3:] == ["--revision", "v1.0", "--finalize"]  # same SOURCE, OUT, revision
    assert by_part["convert --finalize"] == step_args(FINALIZE, spec, layout)

    # The download finalize saw all three parts; the staged source is in place and its staging folder gone.
    staged = json.loads((Path(layout.source_dir) / "ckptflow-download.json").read_text())
    assert staged["part_pids"] == [c["pid"] for c in sorted(calls[0:3], key=lambda c: c["argv"][-1])]
    assert [p.name for p in Path(layout.root).iterdir() if p.name.startswith(".source")] == []

    # Finalize assembled all three shares and removed the staging folder.
    manifest = json.loads((Path(layout.converted_dir) / "ckptflow-manifest.json").read_text())
    assert [p["part"] for p in manifest["parts"]] == [0, 1, 2]
    assert not Path(layout.parts_staging_dir).exists()
    # The staged source's and the converted checkpoint's asset events are the finalizes' (through the download and
    # convert aliases); parts emit none.
    with create_session() as session:
        events = session.query(AssetEvent).filter(AssetEvent.source_run_id == dr.run_id).all()
        by_task = {e.source_task_id: (e.uri, e.extra) for e in events}
        aliases = {e.source_task_id: sorted(a.name for a in e.source_aliases) for e in events}
    assert len(events) == 4 and set(by_task) == {DOWNLOAD_FINALIZE, "finalize", "verify", "publish"}
    assert aliases[DOWNLOAD_FINALIZE] == ["ckptflow-download"] and aliases["finalize"] == ["ckptflow-convert"]
    assert by_task[DOWNLOAD_FINALIZE][0] == Path(layout.source_dir).as_uri()
    assert by_task[DOWNLOAD_FINALIZE][1]["source_revision_sha"] == "f" * 40
    assert by_task["publish"][1]["source_revision_sha"] == "f" * 40
    assert by_task["finalize"][0] == Path(layout.converted_dir).as_uri()
    assert by_task["finalize"][1]["output_digest"] == by_task["publish"][1]["output_digest"]
    assert by_task["finalize"][1]["parts"] == 3


@pytest.mark.parametrize("step", ["download", "convert"])
def test_a_failed_part_is_retried_alone_and_the_other_parts_work_is_kept(fast_retries, fake_cli, monkeypatch, step):
    monkeypatch.setenv("FAKE_CKPTFLOW_FAIL_ONCE", f"{step}@1")
    dr, tis = run_mapped(fast_retries, PARTS_CONF)
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert {i: tis[(step, i)].try_number for i in range(3)} == {0: 1, 1: 2, 2: 1}
    calls = fake_cli()
    runs = [part_of(c["argv"]) for c in calls]
    keys = [f"{step} 0/3", f"{step} 1/3", f"{step} 2/3", f"{step} --finalize"]
    assert [runs.count(k) for k in keys] == [1, 2, 1, 1]
    # The shares the finalize took: parts 0 and 2 from their only (first) run, part 1 from its retry.
    pids = {part_of(c["argv"]): c["pid"] for c in calls}  # the last call of each
    layout = WorkLayout(str(Path(calls[0]["argv"][2]).parent))
    if step == "convert":
        taken = [
            p["pid"] for p in json.loads((Path(layout.converted_dir) / "ckptflow-manifest.json").read_text())["parts"]
        ]
    else:
        taken = json.loads((Path(layout.source_dir) / "ckptflow-download.json").read_text())["part_pids"]
    assert taken == [pids[k] for k in keys[:3]]


@pytest.mark.parametrize("step", ["download", "convert"])
def test_a_part_with_bad_input_stops_the_run_before_its_finalize(fast_retries, fake_cli, monkeypatch, step):
    monkeypatch.setenv("FAKE_CKPTFLOW_EXIT", f"{step}@2:2")
    dr, tis = run_mapped(fast_retries, PARTS_CONF)
    assert dr.state == "failed"
    assert tis[(step, 2)].state == "failed" and tis[(step, 2)].try_number == 1  # bad input: not retried
    assert tis[(step, 0)].state == tis[(step, 1)].state == "success"
    after = (
        (DOWNLOAD_FINALIZE, "convert", "finalize", "verify", "publish")
        if step == "download"
        else ("finalize", "verify", "publish")
    )
    assert {ti.state for (task_id, _), ti in tis.items() if task_id in after} == {"upstream_failed"}
    ran = [part_of(c["argv"]) for c in fake_cli()]
    assert f"{step} --finalize" not in ran and "verify" not in ran
    assert step == "convert" or not [r for r in ran if r.startswith("convert")]  # a failed download: nothing converted


def test_a_split_download_gets_the_token_in_every_part_and_its_finalize_only(fast_retries, fake_cli, monkeypatch):
    secret = "hf_SECRETtoken123456"
    monkeypatch.setenv("AIRFLOW_CONN_CKPTFLOW_HF", json.dumps({"conn_type": "generic", "password": secret}))
    dr, _ = run_mapped(fast_retries, {**CONF, "parts": 2})
    assert dr.state == "success"
    tokens = {part_of(c["argv"]): c["hf_token"] for c in fake_cli()}
    assert tokens == {
        "download 0/2": secret,
        "download 1/2": secret,
        "download --finalize": secret,
        "convert 0/2": None,
        "convert 1/2": None,
        "convert --finalize": None,
        "verify": None,
        "publish": secret,
    }


def test_a_download_finalize_refusing_a_missing_part_is_not_retried(fast_retries, fake_cli, tmp_path, monkeypatch):
    """A part whose files are not there at the finalize (here part 1 exits 0 without fetching anything): the
    finalize exits with status 2 (bad input), which stops the run at once; nothing is converted."""
    wrapper = tmp_path / "lossy.py"
    wrapper.write_text(
        "import runpy, sys\n"
        "if sys.argv[1:2] == ['download'] and '1/2' in sys.argv: sys.exit(0)  # part 1 claims success, fetches "
        "nothing\n"
        f"sys.argv = [{str(FAKE)!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({str(FAKE)!r}, run_name='__main__')\n"
    )
    monkeypatch.setattr(commands, "local_entrypoint", lambda: [sys.executable, str(wrapper)])
    dr, tis = run_mapped(fast_retries, {**CONF, "parts": 2})
    assert dr.state == "failed"
    finalize = tis[(DOWNLOAD_FINALIZE, -1)]
    assert finalize.state == "failed" and finalize.try_number == 1
    assert [part_of(c["argv"]) for c in fake_cli()] == ["download 0/2", "download --finalize"]

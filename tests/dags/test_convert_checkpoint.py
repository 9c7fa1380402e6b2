"""The `convert_checkpoint` DAG: clean and light parsing, typed params rejected with clear messages (also by
the REST API), and full runs on a tiny model with the real `ckptflow` in local mode, in one part and in two (from
a local folder, and from the hub stand-in)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

from operators import commands
from operators.commands import WorkLayout
from operators.embedded import DAGS_FOLDER, ol_events
from tests.stand_ins.fixtures import TOKEN, hub  # noqa: F401  (fixture)

DAG_FILE = DAGS_FOLDER / "convert_checkpoint.py"
# The step operators are KubernetesPodOperators: the cncf.kubernetes provider and its `kubernetes` client are imported
# at parse time as for any DAG with a pod operator (about 1 s of the 2 s the DAG file takes here); nothing else heavy.
HEAVY = ("jax", "jaxlib", "torch", "transformers", "tensorflow", "orbax", "tensorstore", "openlineage")


TASKS = ["plan_parts", "download", "download_finalize", "convert", "finalize", "verify", "publish"]


def test_dag_folder_imports_without_errors(convert_dag):
    assert [t.task_id for t in convert_dag.topological_sort()] == TASKS
    assert convert_dag.schedule is None  # manual trigger only
    for name, param in convert_dag.params.items():  # the doc explains every parameter
        assert f"`{name}`" in convert_dag.doc_md, name
        assert param.description, name


def test_parsing_imports_nothing_heavy():
    code = textwrap.dedent(f"""
        import importlib.util, json, sys, time
        t0 = time.monotonic()
        spec = importlib.util.spec_from_file_location("convert_checkpoint_dag", {str(DAG_FILE)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print(json.dumps({{"heavy": heavy, "seconds": time.monotonic() - t0, "tasks": len(module.dag.tasks)}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [] and result["tasks"] == len(TASKS)
    assert result["seconds"] < 10


GOOD = {"source": "acme/tiny", "destination": "file:///models/tiny/v1"}


@pytest.mark.parametrize(
    "conf, param, reason",
    [
        ({"destination": "file:///x"}, "source", "No value passed"),
        ({**GOOD, "source": "not a repo id!"}, "source", "does not match"),
        ({**GOOD, "source": "relative/path/too/deep"}, "source", "does not match"),
        ({**GOOD, "destination": "gs://bucket"}, "destination", "does not match"),  # gs:// needs a prefix
        ({**GOOD, "destination": "s3://bucket/tiny"}, "destination", "does not match"),
        ({**GOOD, "destination": "/no/scheme"}, "destination", "does not match"),
        ({**GOOD, "revision": "main; rm -rf /"}, "revision", "does not match"),
        ({**GOOD, "model": "gpt-5"}, "model", "is not one of"),
        ({**GOOD, "direction": "both"}, "direction", "is not one of"),
        ({**GOOD, "dtype": "int4"}, "dtype", "is not one of"),
        ({**GOOD, "scan": "yes"}, "scan", "is not of type 'boolean'"),
        ({**GOOD, "max_kl": 0}, "max_kl", "less than or equal to the minimum"),
        ({**GOOD, "max_kl": "0.1"}, "max_kl", "is not of type 'number'"),
        ({**GOOD, "execution_mode": "ssh"}, "execution_mode", "is not one of"),
        ({**GOOD, "node_pool": "gpu-a100"}, "node_pool", "is not one of"),
        ({**GOOD, "parts": 0}, "parts", "is less than the minimum of 1"),
        ({**GOOD, "parts": -2}, "parts", "is less than the minimum of 1"),
        ({**GOOD, "parts": 2.5}, "parts", "is not of type 'integer'"),
        ({**GOOD, "parts": "2"}, "parts", "is not of type 'integer'"),
        ({**GOOD, "parts": True}, "parts", "is not of type 'integer'"),
        ({**GOOD, "parts": 257}, "parts", "is greater than the maximum of 256"),
    ],
)
def test_invalid_params_are_rejected_with_the_param_named(convert_dag, conf, param, reason):
    """Validated as a triggered run is (the scheduler's copy of the DAG, as the REST API uses it)."""
    from airflow.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    served = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(convert_dag))
    with pytest.raises(ParamValidationError) as err:
        served.params.deep_merge(conf).validate()
    message = str(err.value)
    assert message.startswith(f"Invalid input for param {param}:"), message
    assert reason in message, message


def test_valid_params_pass(convert_dag):
    from airflow.serialization.serialized_objects import DagSerialization

    served = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(convert_dag))
    values = served.params.deep_merge({**GOOD, "model": "qwen3-0.6b", "max_kl": 0.03, "scan": False}).validate()
    assert values["revision"] == "main" and values["execution_mode"] == "local" and values["scan"] is False
    assert values["parts"] == 1  # one process unless asked
    assert served.params.deep_merge({**GOOD, "parts": 256}).validate()["parts"] == 256


def test_rest_api_rejects_bad_conf_with_a_400_naming_the_param(convert_dag, monkeypatch):
    from airflow.api_fastapi.app import create_app
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from fastapi.testclient import TestClient

    # What the DAG processor does: register the bundle, store the serialized DAG the API serves.
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(
        BundleDagBag(dag_folder=str(DAGS_FOLDER), bundle_path=str(DAGS_FOLDER), bundle_name="dags-folder"),
        "dags-folder",
        None,
    )
    monkeypatch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "True")
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "ckptflow-test-" + "0" * 64)
    client = TestClient(create_app("core"))
    url = "/api/v2/dags/convert_checkpoint/dagRuns"
    bad = client.post(url, json={"logical_date": None, "conf": {**GOOD, "max_kl": -1}})
    assert bad.status_code == 400
    assert bad.json()["detail"].startswith("Invalid input for param max_kl:")
    bad = client.post(url, json={"logical_date": None, "conf": {**GOOD, "parts": 0}})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("Invalid input for param parts:")
    form = client.get("/api/v2/dags/convert_checkpoint/details").json()["params"]
    assert form["node_pool"]["schema"]["enum"][0] == "cpu-standard" and form["scan"]["schema"]["type"] == "boolean"
    # The form's field for parts: a whole number from 1, explained (shared storage, when to use it).
    assert form["parts"]["value"] == 1
    assert {k: form["parts"]["schema"][k] for k in ("type", "minimum", "maximum")} == {
        "type": "integer",
        "minimum": 1,
        "maximum": 256,
    }
    assert "shared" in form["parts"]["description"] and "very large models" in form["parts"]["description"]


FLAKY = """\
import os, sys
from pathlib import Path

args = sys.argv[1:]
marker = Path(os.environ["FLAKY_MARKER"])
if args[0] == "convert" and not marker.exists():
    # First try of convert dies half-way: a temp folder of a killed process, a stale partial output.
    marker.touch()
    out = Path(args[2])
    temp = out.parent / f".{out.name}.ckptflow-tmp-999999999-dead"
    temp.mkdir(parents=True)
    (temp / "partial.bin").write_bytes(b"junk")
    out.mkdir()
    (out / "half-written.bin").write_bytes(b"junk")
    print("simulated crash in the middle of convert", file=sys.stderr)
    sys.exit(1)
os.execv(sys.executable, [sys.executable, "-m", "converters", *args])
"""


def _run_steps_through(script: str, convert_dag, tmp_path, monkeypatch, **env: str) -> None:
    """Every step's CLI runs through `script` (a wrapper that may fail once, then execs the real CLI), with
    `env` set, run folders under tmp_path/work and the DAG's retry policy without its waits."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(script)
    monkeypatch.setattr(commands, "local_entrypoint", lambda: [sys.executable, str(wrapper)])
    for key, value in {**env, "CKPTFLOW_WORK_ROOT": str(tmp_path / "work")}.items():
        monkeypatch.setenv(key, value)
    for task in convert_dag.tasks:
        monkeypatch.setattr(task, "retry_delay", timedelta(0))  # same policy, waits of 1-2 s


def test_full_run_on_a_tiny_model_in_local_mode(isolated_runs, tiny_model, tmp_path, monkeypatch):
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    convert_dag = isolated_runs

    source = tiny_model("llama3.1")
    _run_steps_through(FLAKY, convert_dag, tmp_path, monkeypatch, FLAKY_MARKER=str(tmp_path / "convert-failed-once"))
    home = Path(os.environ["AIRFLOW_HOME"])
    seen_events = len(ol_events(home))
    dest = tmp_path / "published" / "tiny-llama" / "v1"

    dr = convert_dag.test(run_conf={"source": str(source), "destination": dest.as_uri(), "dtype": "float32"})

    tis = {ti.task_id: ti for ti in dr.get_task_instances()}
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert {k: ti.try_number for k, ti in tis.items()} == {
        "download": 1,
        "download_finalize": 1,
        "plan_parts": 1,
        "convert": 2,
        "finalize": 1,
        "verify": 1,
        "publish": 1,
    }

    # The published checkpoint is the verified one, complete, with nothing of the crashed try in it.
    manifest = json.loads((dest / "ckptflow-manifest.json").read_text())
    assert manifest["family"] == "llama3.1" and manifest["options"]["dtype"] == "float32"
    assert (dest / "0" / "items" / "_METADATA").exists() and not (dest / "half-written.bin").exists()
    run_dir = next((tmp_path / "work" / "convert_checkpoint").iterdir())
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    report = json.loads((run_dir / "verify" / "verify.json").read_text())
    assert report["summary"]["passed"] is True and report["summary"]["kl_max"] < 1e-3
    receipt = json.loads((run_dir / "publish.json").read_text())
    assert receipt["status"] == "published" and receipt["destination"] == dest.as_uri()

    # Asset events, one per step, with the extras.
    with create_session() as session:
        events = session.query(AssetEvent).filter(AssetEvent.source_run_id == dr.run_id).all()
        by_task = {e.source_task_id: (e.uri, e.extra) for e in events}
    assert set(by_task) == {"download", "convert", "verify", "publish"}
    uri, extra = by_task["publish"]
    assert uri == dest.as_uri()
    for key in (
        "model",
        "direction",
        "layout",
        "dtype",
        "family",
        "output_digest",
        "published_digest",
        "source_digest",
    ):
        assert extra.get(key), key
    assert extra["direction"] == "hf-to-maxtext" and extra["layout"] == "scanned" and extra["dtype"] == "float32"
    assert extra["verify"]["passed"] is True and extra["verify"]["kl_max"] == report["summary"]["kl_max"]
    assert extra["published_digest"] == receipt["digest"]
    assert by_task["convert"][1]["output_digest"] == extra["output_digest"]
    assert by_task["download"][0] == (run_dir / "source").as_uri()

    # OpenLineage: START and COMPLETE for every task, with the datasets and the ckptflow facet.
    events = [e for e in ol_events(home)[seen_events:] if e["job"]["name"].startswith("convert_checkpoint.")]
    kinds = {(e["job"]["name"].split(".", 1)[1], e["eventType"]) for e in events}
    for step in ("download", "convert", "verify", "publish"):
        assert {(step, "START"), (step, "COMPLETE")} <= kinds, step
    done = {e["job"]["name"].split(".", 1)[1]: e for e in events if e["eventType"] == "COMPLETE"}
    assert done["download"]["inputs"][0] == {"namespace": "file", "name": str(Path(source).resolve()), "facets": {}}
    out = done["publish"]["outputs"][0]
    assert (out["namespace"], out["name"]) == ("file", str(dest))
    assert out["facets"]["version"]["datasetVersion"] == receipt["digest"]
    facet = done["verify"]["run"]["facets"]["ckptflow"]["extras"]
    assert facet["verify"]["passed"] is True and facet["source_digest"] == extra["source_digest"]
    checkpoint = done["verify"]["inputs"][1]
    assert checkpoint["inputFacets"]["dataQualityAssertions"]["assertions"][0]["success"] is True


FLAKY_PART = """\
import os, subprocess, sys
from pathlib import Path

args = sys.argv[1:]
marker = Path(os.environ["FLAKY_MARKER"])
real = [sys.executable, "-m", "converters", *args]
with open(os.environ["CALL_LOG"], "a") as log:
    print(" ".join(args), file=log)
if (args[0] == "convert" and "--part" in args and args[args.index("--part") + 1].startswith("1/")
        and not marker.exists()):
    # Convert part 1's first try writes its share, then its pod or process dies before reporting success.
    marker.touch()
    subprocess.run(real, check=True)
    print("simulated crash of part 1 after writing", file=sys.stderr)
    sys.exit(1)
if args[0] == "download" and "--part" in args:
    # What a download part left in the work folder (a local source's part: nothing).
    code = subprocess.run(real).returncode
    with open(os.environ["CALL_LOG"], "a") as log:
        print("after download part:", *sorted(os.listdir(Path(args[2]).parent)), file=log)
    sys.exit(code)
os.execv(sys.executable, real)
"""


def test_full_run_in_two_parts_on_a_tiny_model(isolated_runs, tiny_model, tmp_path, monkeypatch):
    """parts=2 with the real `ckptflow download|convert --part/--finalize`: the download parts of a local source do
    nothing and download_finalize copies it; convert part 1 dies once after writing and is retried alone, finalize
    assembles, verify passes, and the result equals the single-process conversion."""
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    convert_dag = isolated_runs

    source = tiny_model("llama3.1")
    _run_steps_through(
        FLAKY_PART,
        convert_dag,
        tmp_path,
        monkeypatch,
        FLAKY_MARKER=str(tmp_path / "part-1-failed-once"),
        CALL_LOG=str(tmp_path / "calls.txt"),
    )
    dest = tmp_path / "published" / "tiny-llama" / "v2"

    dr = convert_dag.test(
        run_conf={"source": str(source), "destination": dest.as_uri(), "dtype": "float32", "parts": 2}
    )

    tis = {(ti.task_id, ti.map_index): ti for ti in dr.get_task_instances()}
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert {k: ti.try_number for k, ti in tis.items() if k[0] != "plan_parts"} == {
        ("download", 0): 1,
        ("download", 1): 1,
        ("download_finalize", -1): 1,
        ("convert", 0): 1,
        ("convert", 1): 2,
        ("finalize", -1): 1,
        ("verify", -1): 1,
        ("publish", -1): 1,
    }
    log = (tmp_path / "calls.txt").read_text().splitlines()
    calls = [line.split() for line in log if line.startswith("convert")]
    runs = [c[c.index("--part") + 1] if "--part" in c else c[-1] for c in calls]
    assert sorted(runs[:-1]) == ["0/2", "1/2", "1/2"] and runs[-1] == "--finalize"  # part 0 ran once
    # Both download parts ran and left nothing (a local folder has nothing to split); the finalize copied it.
    downloads = [line.split() for line in log if line.startswith("download")]
    assert sorted(c[-1] for c in downloads[:2]) == ["0/2", "1/2"] and downloads[2][-1] == "--finalize"
    assert all(c[1] == str(source) and c[2].endswith("/source") for c in downloads)
    assert [line for line in log if line.startswith("after download part:")] == ["after download part:"] * 2

    # The published checkpoint is complete, its manifest records the two parts, and no staging is left behind.
    manifest = json.loads((dest / "ckptflow-manifest.json").read_text())
    assert manifest["family"] == "llama3.1" and manifest["options"]["dtype"] == "float32"
    assert [p["part"] for p in manifest["parts"]] == [0, 1] and all(
        p["digest"].startswith("sha256:") for p in manifest["parts"]
    )
    assert (dest / "0" / "items" / "_METADATA").exists()
    run_dir = next((tmp_path / "work" / "convert_checkpoint").iterdir())
    # Same tensors as the single-process command the pipeline runs with parts=1 (same options, one process).
    single = WorkLayout(str(tmp_path / "single"))
    spec = commands.RunSpec(source=str(source), destination=dest.as_uri(), dtype="float32")
    args = commands.step_args("convert", spec, single)
    args[1] = str(run_dir / "source")
    subprocess.run([sys.executable, "-m", "converters", *args], check=True, capture_output=True, timeout=600)
    assert (
        json.loads((Path(single.converted_dir) / "ckptflow-manifest.json").read_text())["output_digest"]
        == manifest["output_digest"]
    )
    assert not Path(WorkLayout(str(run_dir)).parts_staging_dir).exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]
    report = json.loads((run_dir / "verify" / "verify.json").read_text())
    assert report["summary"]["passed"] is True and report["summary"]["kl_max"] < 1e-3

    # The converted checkpoint's asset event comes from finalize (parts emit none), and later steps agree with it.
    with create_session() as session:
        events = session.query(AssetEvent).filter(AssetEvent.source_run_id == dr.run_id).all()
        by_task = {e.source_task_id: (e.uri, e.extra) for e in events}
    assert set(by_task) == {"download_finalize", "finalize", "verify", "publish"}
    assert by_task["download_finalize"][0] == (run_dir / "source").as_uri()
    staged = json.loads((run_dir / "source" / "ckptflow-download.json").read_text())
    assert staged["kind"] == "local" and by_task["download_finalize"][1]["source_digest"] == staged["digest"]
    assert by_task["finalize"][0] == (run_dir / "converted").as_uri()
    assert by_task["finalize"][1]["output_digest"] == by_task["publish"][1]["output_digest"]
    assert by_task["publish"][1]["parts"] == 2


def sharded_repo(model: Path, shards: int) -> dict[str, bytes]:
    """The files of a hub repo holding `model` with its weights in `shards` safetensors files of about the same
    size and their index, so that a download in parts has weight files to split."""
    from safetensors.torch import load_file, save_file

    groups, sizes = [{} for _ in range(shards)], [0] * shards
    for name, t in sorted(load_file(model / "model.safetensors").items(), key=lambda kv: -kv[1].nbytes):
        i = sizes.index(min(sizes))  # the biggest tensors first, each into the smallest shard so far
        groups[i][name], sizes[i] = t, sizes[i] + t.nbytes
    files = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file() and p.name != "model.safetensors"}
    weight_map = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, group in enumerate(groups):
            name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(group, Path(tmp, name), metadata={"format": "pt"})
            files[name] = Path(tmp, name).read_bytes()
            weight_map.update(dict.fromkeys(group, name))
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    ).encode()
    return files


def test_two_parts_from_the_hub_fetch_each_weight_file_once(isolated_runs, tiny_model, hub, tmp_path, monkeypatch):  # noqa: F811
    """parts=2 from a private repo on the hub stand-in with the real `ckptflow download --part/--finalize`: each part
    fetches its own shards with the token from the connection, download_finalize fetches no weights, every weight
    file is fetched exactly once and at the resolved commit, and the conversion is verified and published."""
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    from operators.local import LocalCommandRunner

    convert_dag = isolated_runs
    files = sharded_repo(Path(tiny_model("llama3.1")), 3)
    shards = {n for n in files if n.endswith(".safetensors")}
    sha = hub.state.commit("acme/tiny-llama", files, private=True)  # without the token: 401 on every file
    monkeypatch.setenv("AIRFLOW_CONN_CKPTFLOW_HF", json.dumps({"conn_type": "generic", "password": TOKEN}))
    monkeypatch.setenv("CKPTFLOW_WORK_ROOT", str(tmp_path / "work"))
    fetched = {}  # the command's last argument (its part, or --finalize) -> the files it fetched

    real_run = LocalCommandRunner.run

    def run(self, argv, **kwargs):  # the tasks run one at a time in dag.test: requests in between are theirs
        start = len(hub.downloads())
        result = real_run(self, argv, **kwargs)
        if "download" in argv:
            fetched[argv[-1]] = hub.downloads()[start:]
        return result

    monkeypatch.setattr(LocalCommandRunner, "run", run)
    dest = tmp_path / "published" / "tiny-llama" / "v3"

    dr = convert_dag.test(
        run_conf={
            "source": "acme/tiny-llama",
            "revision": "main",
            "destination": dest.as_uri(),
            "dtype": "float32",
            "parts": 2,
        }
    )

    tis = {(ti.task_id, ti.map_index): ti for ti in dr.get_task_instances()}
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert sorted(fetched) == ["--finalize", "0/2", "1/2"]
    mine = [{n for n in fetched[p] if n in shards} for p in ("0/2", "1/2")]
    assert mine[0] and mine[1] and mine[0] | mine[1] == shards  # each part fetched its own share ...
    assert not {n for n in fetched["--finalize"] if n in shards}  # ... and the finalize only the small files
    assert Counter(n for n in hub.downloads("acme/tiny-llama") if n in shards) == dict.fromkeys(shards, 1)
    assert {p.split("/")[4] for m, p in hub.state.requests if "/resolve/" in p} == {sha}  # all at the commit

    run_dir = next((tmp_path / "work" / "convert_checkpoint").iterdir())
    staged = json.loads((run_dir / "source" / "ckptflow-download.json").read_text())
    assert staged["revision"] == sha and shards | {"model.safetensors.index.json", "config.json"} <= set(
        staged["files"]
    )
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".")]  # the parts' staging folder is gone
    report = json.loads((run_dir / "verify" / "verify.json").read_text())
    assert report["summary"]["passed"] is True
    assert json.loads((dest / "ckptflow-manifest.json").read_text())["family"] == "llama3.1"
    with create_session() as session:
        events = session.query(AssetEvent).filter(AssetEvent.source_run_id == dr.run_id).all()
        by_task = {e.source_task_id: (e.uri, e.extra) for e in events}
    assert set(by_task) == {"download_finalize", "finalize", "verify", "publish"}
    assert by_task["download_finalize"][1]["source_revision_sha"] == sha
    assert by_task["publish"][1]["source_digest"] == staged["digest"]

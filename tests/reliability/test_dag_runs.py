"""Two `convert_checkpoint` DAG runs at once, same source, same destination, with a sentinel HF token.

Each run is a separate process (its own Airflow home: a copy of one migrated SQLite database, LocalExecutor
settings, `dag.test()`), both with the real `ckptflow` behind a thin wrapper that (a) records, per step,
whether the step got the token (a yes/no, never the token) and (b) holds every publish at a barrier until
both runs reach it, so the two publishes certainly overlap.

Then:
* concurrency: both runs succeed; one publish says "published", the other waited for it and says
  "unchanged"; the destination is one complete checkpoint (manifest digests right), with nothing beside it;
* secrets: the token reached download and publish only, and appears in no file either run wrote (task logs,
  Airflow's database, OpenLineage events, work folders, manifests, reports, receipts, the destination), in
  neither process's output, nor in the pod specs rendered for every step in kubernetes mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SENTINEL = "hf_SENTINELtokenDoNotLeak0123456789abcdef"

WRAPPER = """\
import hashlib, os, sys, time
from pathlib import Path

args = sys.argv[1:]
token = os.environ.get("HF_TOKEN")
got = "yes" if token and hashlib.sha256(token.encode()).hexdigest() == os.environ["TOKEN_SHA256"] else "no"
with open(os.environ["STEP_RECORD"], "a") as f:
    f.write(f"{args[0]} token={got}\\n")
if args[0] == "publish":  # both runs publish at the same time
    barrier = Path(os.environ["PUBLISH_BARRIER"])
    barrier.mkdir(parents=True, exist_ok=True)
    (barrier / str(os.getpid())).touch()
    deadline = time.monotonic() + 300
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
os.execv(sys.executable, [sys.executable, "-m", "converters", *args])
"""

DRIVER = """\
import json, os, sys
from pathlib import Path

from operators.embedded import DAGS_FOLDER, configure

home = Path(sys.argv[1])
configure(home)
from datetime import timedelta

from airflow.dag_processing.dagbag import DagBag

dag = DagBag(dag_folder=str(DAGS_FOLDER)).get_dag("convert_checkpoint")
for task in dag.tasks:
    task.retry_delay = timedelta(0)
conf = json.loads(sys.argv[2])
dr = dag.test(run_conf=conf)
states = {ti.task_id: ti.state for ti in dr.get_task_instances()}

# The pod each step would run in kubernetes mode, rendered with the token connection in place.
from operators.ckptflow_operators import OPERATORS
from operators.commands import RunSpec, WorkLayout, step_args
from operators.kubernetes import KubernetesSettings, build_pod_operator, node_pool, pod_manifest
from operators.pod_secret import secret_name

spec = RunSpec.from_params({**conf, "model": "llama3.1-8b", "execution_mode": "kubernetes"})
layout = WorkLayout.for_run("/ckptflow-work", dag.dag_id, dr.run_id)
pods = {}
for step in OPERATORS:
    # the pod reads the token from its task instance's Secret (operators/pod_secret.py), as the step operator sets it
    kpo = build_pod_operator(task_id=step, step=step, args=step_args(step, spec, layout), pool=node_pool("cpu-highmem"),
                             model=spec.model_name, settings=KubernetesSettings(), timeout_seconds=3600,
                             hf_token_secret=secret_name(dag.dag_id, dr.run_id, step))
    pods[step] = pod_manifest(kpo)
(home / "pod-specs.json").write_text(json.dumps(pods, indent=2, default=str))
result = {"state": str(dr.state), "tasks": {k: str(v) for k, v in states.items()}, "run_id": dr.run_id}
print("RESULT " + json.dumps(result))
"""


def _grep(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                if needle in p.read_bytes():
                    hits.append(str(p))
            except OSError:
                pass
    return hits


@pytest.fixture(scope="module")
def two_runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dag-runs")
    repo = Path(__file__).resolve().parents[2]
    source = tiny_model("llama3.1")
    dest = root / "published" / "tiny-llama" / "v1"
    (root / "wrapper.py").write_text(WRAPPER)
    (root / "driver.py").write_text(DRIVER)
    base_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CKPTFLOW_TEST_AIRFLOW_HOME"))},
        "PYTHONPATH": str(repo),
        "JAX_PLATFORMS": "cpu",
        "CKPTFLOW_CLI": f"{sys.executable} {root / 'wrapper.py'}",
        "TOKEN_SHA256": hashlib.sha256(SENTINEL.encode()).hexdigest(),
        "PUBLISH_BARRIER": str(root / "barrier"),
        # The HF token as Airflow reads a connection from a secrets backend or the environment.
        "AIRFLOW_CONN_CKPTFLOW_HF": json.dumps({"conn_type": "generic", "password": SENTINEL}),
        # ...and in the worker's own environment, where a deployment might also have put it
        "HF_TOKEN": SENTINEL,
    }
    # One migrated metadata database, copied for each run (each run is its own Airflow installation).
    template = root / "template-home"
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from operators.embedded import configure, migrate; "
            "configure(Path(sys.argv[1])); migrate()",
            str(template),
        ],
        env=base_env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    procs = []
    conf = {"source": str(source), "destination": dest.as_uri(), "dtype": "float32"}
    for i in range(2):
        home = root / f"home{i}"
        home.mkdir()
        shutil.copy(template / "airflow.db", home / "airflow.db")
        env = {**base_env, "STEP_RECORD": str(root / f"steps{i}.txt")}  # work folders: <home>/ckptflow-work
        out = open(root / f"run{i}.out", "w")
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(root / "driver.py"), str(home), json.dumps(conf)],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=root,
                ),
                out,
            )
        )
    results = []
    for p, out in procs:
        p.wait(timeout=900)
        out.close()
    for i in range(2):
        text = (root / f"run{i}.out").read_text()
        line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
        assert line, text[-4000:]
        results.append(json.loads(line[len("RESULT ") :]))
    return root, dest, results


def test_two_dag_runs_publish_one_checkpoint(two_runs, rel):
    root, dest, results = two_runs
    for r in results:
        assert r["state"] == "success", r
    receipts = [
        json.loads(p.read_text()) for p in sorted(root.glob("home*/ckptflow-work/convert_checkpoint/*/publish.json"))
    ]
    assert sorted(r["status"] for r in receipts) == ["published", "unchanged"], receipts
    # the same checkpoint (Orbax file bytes differ between two conversions; the tensor-level digest does not)
    assert len({r["output_digest"] for r in receipts}) == 1
    manifest = rel.check_complete(dest)
    assert manifest["output_digest"] == receipts[0]["output_digest"]
    assert (dest / "0" / "items" / "_METADATA").exists() and manifest["options"]["dtype"] == "float32"
    assert rel.siblings(dest) == []
    # both publishes really ran at the same time: each one's wrapper waited at the barrier for the other
    assert len(list((root / "barrier").iterdir())) == 2


def test_the_token_reaches_only_the_credential_steps_and_is_written_nowhere(two_runs):
    root, dest, results = two_runs
    for i in range(2):
        steps = (root / f"steps{i}.txt").read_text().split()
        assert steps == [
            "download",
            "token=yes",
            "convert",
            "token=no",
            "verify",
            "token=no",
            "publish",
            "token=yes",
        ], steps
    pods = json.loads((root / "home0" / "pod-specs.json").read_text())
    assert set(pods) == {"download", "convert", "verify", "publish"}
    env = {step: {e["name"]: e for e in p["spec"]["containers"][0].get("env", [])} for step, p in pods.items()}
    assert "secretKeyRef" in env["download"]["HF_TOKEN"]["valueFrom"] and "HF_TOKEN" not in env["convert"]
    assert _grep(root, SENTINEL.encode()) == []  # homes (logs, airflow.db, lineage), work folders, outputs, pod specs
    assert _grep(dest, SENTINEL.encode()) == []
    assert SENTINEL not in json.dumps(results)

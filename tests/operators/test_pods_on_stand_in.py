"""Kubernetes mode for real: `convert_checkpoint` runs (dag.test) whose every step is a pod on the Kubernetes API
stand-in (tests/stand_ins/kube_api.py), created, watched, logged and deleted by the step operators themselves
(they are KubernetesPodOperators), in both the synchronous and the deferrable mode; the pods run the stand-in
`ckptflow` (tests/operators/fake_ckptflow.py) as the converter image would run the real one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from operators.commands import STEPS
from operators.kubernetes import NODEPOOL_LABEL
from tests.stand_ins.fixtures import kube  # noqa: F401  (fixture)

FAKE = Path(__file__).with_name("fake_ckptflow.py")
IMAGE = "ckptflow-converter:test"
SECRET = "hf_ONLYinItsOwnSecret_0123456789"
CONF = {
    "source": "acme/tiny",
    "revision": "v1.0",
    "destination": "file:///tmp/ckptflow-test-dest/never-written",
    "execution_mode": "kubernetes",
    "model": "qwen3-0.6b",
    "node_pool": "cpu-standard",
}


@pytest.fixture
def cluster(isolated_runs, kube, tmp_path, monkeypatch):
    """The stand-in API (`kube`) with a `ckptflow-cpu` node and the converter image (its `ckptflow` is the stand-in
    one, on the image's PATH); the workers' settings point the step pods at it; the HF token is in the Airflow
    connection. Returns (server, DAG, calls of the stand-in ckptflow)."""
    from tests.stand_ins.kube_api import Image, Node

    state = tmp_path / "fake-state"
    bindir = tmp_path / "image-bin"
    bindir.mkdir()
    program = bindir / "ckptflow"
    program.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
    program.chmod(0o755)
    image_env = {"PATH": f"{bindir}:{os.environ['PATH']}", "FAKE_CKPTFLOW_STATE": str(state)}
    for var in ("FAKE_CKPTFLOW_EXIT", "FAKE_CKPTFLOW_FAIL_ONCE", "FAKE_CKPTFLOW_SLEEP"):
        if os.environ.get(var):
            image_env[var] = os.environ[var]
    kube.set_nodes([Node("cpu-node", labels={NODEPOOL_LABEL: "ckptflow-cpu"})])
    kube.add_image(IMAGE, Image(env=image_env))
    monkeypatch.setenv("CKPTFLOW_K8S_IMAGE", IMAGE)
    monkeypatch.setenv("CKPTFLOW_K8S_CONN_ID", "kubernetes_default")
    monkeypatch.setenv("AIRFLOW_CONN_CKPTFLOW_HF", json.dumps({"conn_type": "generic", "password": SECRET}))
    dag = isolated_runs
    saved = {t.task_id: (t.retry_delay, getattr(t, "poll_interval", None)) for t in dag.tasks}
    for t in dag.tasks:
        t.retry_delay = type(t.retry_delay)(0)
        if hasattr(t, "poll_interval"):  # the trigger's and the sync wait's polling
            t.poll_interval = 0.2
            t.startup_check_interval_seconds = 0.2

    def calls():
        path = state / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    yield kube, dag, calls
    for t in dag.tasks:
        t.retry_delay, poll = saved[t.task_id]
        if poll is not None:
            t.poll_interval = poll


def run(dag, conf=CONF):
    dr = dag.test(run_conf=conf)
    return dr, {ti.task_id: ti for ti in dr.get_task_instances()}


def changes(server) -> list[tuple[str, str, str]]:
    return [(r.method, r.path, r.body) for r in server.requests if r.method != "GET"]


def assert_token_only_in_its_secrets(server):
    """The token is sent once per download/publish pod, in the body of the Secret it reads, and nowhere else (pod
    specs, patches, anything); every Secret is gone at the end, with every pod."""
    with_token = [(m, p) for m, p, b in changes(server) if SECRET in b]
    assert with_token and all(m == "POST" and p.endswith("/secrets") for m, p in with_token), with_token
    assert not any(SECRET in p for _, p, _ in changes(server))
    with server.state.lock:
        secrets = [name for _, name in server.state.objects["secrets"]]
    assert server.pods() == [] and not [n for n in secrets if n.startswith("ckptflow-")], secrets


def test_every_step_runs_as_a_pod_and_the_token_stays_in_its_secret(cluster, capfd):
    server, dag, calls = cluster
    dr, tis = run(dag)
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    log = capfd.readouterr()
    for step in STEPS:  # each pod's output streamed into its task's log
        assert f"[base] fake ckptflow {step}: starting" in log.out + log.err, step
    created = [json.loads(b) for m, p, b in changes(server) if m == "POST" and p.endswith("/pods")]
    assert [pod["metadata"]["labels"]["ckptflow/step"] for pod in created] == list(STEPS)
    assert [c["argv"][0] for c in calls()] == list(STEPS)  # the pods ran the image's ckptflow, step by step
    # the token reached the two steps that talk to the hub, through their Secrets, and no other
    assert {c["argv"][0]: c["hf_token"] for c in calls()} == {
        "download": SECRET,
        "convert": None,
        "verify": None,
        "publish": SECRET,
    }
    for pod in created:
        (container,) = pod["spec"]["containers"]
        assert container["command"] == ["ckptflow"] and pod["spec"]["nodeSelector"] == {NODEPOOL_LABEL: "ckptflow-cpu"}
        refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "valueFrom" in e]
        assert len(refs) == (pod["metadata"]["labels"]["ckptflow/step"] in ("download", "publish")), pod["metadata"]
    # each token Secret was made its pod's dependent (garbage-collected with it)
    patches = [json.loads(b) for m, p, b in changes(server) if m == "PATCH" and "/secrets/" in p]
    assert len(patches) == 2 and all(x["metadata"]["ownerReferences"][0]["kind"] == "Pod" for x in patches)
    assert_token_only_in_its_secrets(server)


def test_deferrable_steps_free_the_worker_and_resume(cluster, monkeypatch):
    """With `deferrable` (as `[operators] default_deferrable = True` makes every pod operator), each step creates its
    pod, defers to KubernetesPodTrigger, and resumes in `trigger_reentry` to finish (lineage, checks)."""
    from operators.ckptflow_operators import CkptflowStepOperator

    server, dag, calls = cluster
    resumed = []
    original = CkptflowStepOperator.trigger_reentry

    def spy(self, context, event):
        resumed.append((self.task_id, event["status"]))
        return original(self, context, event)

    monkeypatch.setattr(CkptflowStepOperator, "trigger_reentry", spy)
    for t in dag.tasks:
        if isinstance(getattr(t, "partial_kwargs", None), dict):  # the mapped parts are made from these
            monkeypatch.setitem(t.partial_kwargs, "deferrable", True)
        elif hasattr(t, "deferrable"):
            monkeypatch.setattr(t, "deferrable", True)
    dr, tis = run(dag)
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert resumed == [(step, "success") for step in STEPS]
    assert [c["argv"][0] for c in calls()] == list(STEPS)
    assert_token_only_in_its_secrets(server)


@pytest.mark.parametrize("default", ["True", "False"])
def test_the_global_default_decides_whether_steps_defer(airflow_db, default):
    """`[operators] default_deferrable` (read when the DAG is parsed, as for every deferrable operator) is what the
    step operators and their mapped parts use."""
    import subprocess

    code = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        "from operators.embedded import DAGS_FOLDER\n"
        "dag = DagBag(dag_folder=str(DAGS_FOLDER)).get_dag('convert_checkpoint')\n"
        "from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator as K\n"
        "import inspect\n"
        "default = inspect.signature(K.__init__).parameters['deferrable'].default  # a mapped part's, unmapped\n"
        "steps = [t for t in dag.tasks if t.task_id != 'plan_parts']\n"
        "print(sorted({str(t.partial_kwargs.get('deferrable', default) if hasattr(t, 'partial_kwargs') else"
        " t.deferrable) for t in steps}))\n"
    )
    env = {**os.environ, "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": default}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == f"['{default}']"


@pytest.fixture
def bad_input(monkeypatch):
    monkeypatch.setenv("FAKE_CKPTFLOW_EXIT", "convert:2")


def test_a_pod_exiting_2_fails_the_step_without_retries(bad_input, cluster):
    server, dag, calls = cluster
    dr, tis = run(dag)
    assert dr.state == "failed"
    assert tis["convert"].state == "failed" and tis["convert"].try_number == 1  # bad input: not retried
    assert [c["argv"][0] for c in calls()] == ["download", "convert"]
    assert server.pods() == []


@pytest.fixture
def flaky_convert(monkeypatch):
    monkeypatch.setenv("FAKE_CKPTFLOW_FAIL_ONCE", "convert")


def test_a_failed_pod_is_retried_in_a_new_pod(flaky_convert, cluster):
    server, dag, calls = cluster
    dr, tis = run(dag)
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert tis["convert"].try_number == 2
    convert_pods = [p for m, p, b in changes(server) if m == "POST" and p.endswith("/pods") and '"convert"' in b]
    assert len(convert_pods) == 2 and server.pods() == []


def test_a_pod_that_cannot_be_scheduled_times_out_with_the_reason(cluster, monkeypatch):
    """No node of the chosen pool (cpu-highmem): the pod stays Pending; the step fails after the pool's schedule
    timeout (shortened here) saying so, and the pod is deleted."""
    import dataclasses

    from operators import kubernetes

    server, dag, calls = cluster
    pools = dict(kubernetes.NODE_POOLS)
    pools["cpu-highmem"] = dataclasses.replace(pools["cpu-highmem"], schedule_timeout_seconds=2)
    monkeypatch.setattr(kubernetes, "NODE_POOLS", pools)
    for t in dag.tasks:
        monkeypatch.setattr(t, "retries", 0)
    dr, tis = run(dag, {**CONF, "node_pool": "cpu-highmem"})
    assert dr.state == "failed" and tis["download"].state == "failed"
    assert calls() == []  # nothing ran
    assert server.pods() == []
    events = [e for e in server.events(namespace="ckptflow") if e.get("reason") == "FailedScheduling"]
    assert events and "node" in events[0]["message"].lower()


def test_each_part_is_a_pod_of_its_own(cluster):
    """`parts=2` on a TPU preset: download and convert map one pod per part, then one finalize pod each, all on the CPU
    pool (no step computes on a TPU); every download part reads the token from its own task instance's Secret."""
    server, dag, calls = cluster
    dr = dag.test(run_conf={**CONF, "parts": 2, "node_pool": "tpu-v6e-8"})
    assert dr.state == "success", {(t.task_id, t.map_index): t.state for t in dr.get_task_instances()}
    created = [json.loads(b) for m, p, b in changes(server) if m == "POST" and p.endswith("/pods")]
    args = [
        " ".join(pod["spec"]["containers"][0]["args"][:1] + pod["spec"]["containers"][0]["args"][-2:])
        for pod in created
    ]
    assert len(created) == 8, args
    names = {pod["metadata"]["name"].rsplit("-", 1)[0] for pod in created}
    assert {"ckptflow-download-part-0", "ckptflow-download-part-1", "ckptflow-convert-part-0"} <= names
    assert {"ckptflow-download-finalize", "ckptflow-finalize"} <= names
    assert all(pod["spec"]["nodeSelector"] == {NODEPOOL_LABEL: "ckptflow-cpu"} for pod in created)
    parts = [pod for pod in created if pod["metadata"]["labels"].get("ckptflow/part") == "1"]
    assert {pod["metadata"]["labels"]["ckptflow/step"] for pod in parts} == {"download", "convert"}
    secrets = {
        pod["metadata"]["name"]: [
            e["valueFrom"]["secretKeyRef"]["name"] for e in pod["spec"]["containers"][0]["env"] if "valueFrom" in e
        ]
        for pod in created
        if pod["metadata"]["labels"]["ckptflow/step"] in ("download", "download_finalize", "publish")
    }
    refs = [r for rs in secrets.values() for r in rs]
    assert len(refs) == 4 and len(set(refs)) == 4, secrets  # 2 parts, the finalize, publish: a Secret each
    assert [c["argv"][0] for c in calls()].count("convert") == 3
    assert_token_only_in_its_secrets(server)


@pytest.fixture
def slow_convert(monkeypatch):
    monkeypatch.setenv("FAKE_CKPTFLOW_SLEEP", "convert:3")


def test_a_retry_after_a_lost_worker_reattaches_to_the_running_pod(slow_convert, cluster, monkeypatch):
    """The worker running convert dies while its pod runs (simulated: waiting raises, no cleanup runs, as after a
    SIGKILL); the next try finds the pod still running, follows it to the end instead of starting a second one."""
    from operators.ckptflow_operators import CkptflowStepOperator

    server, dag, calls = cluster
    lost = []
    wait, complete = CkptflowStepOperator.await_pod_completion, CkptflowStepOperator.post_complete_action

    def dies_once(self, pod):
        if self.step == "convert" and not lost:
            lost.append(pod.metadata.name)
            raise RuntimeError("worker lost")
        return wait(self, pod)

    skipped = []

    def no_cleanup_when_dead(self, **kwargs):
        if self.step == "convert" and lost and not skipped:  # the dead worker's try cleans nothing up
            skipped.append(True)
            return None
        return complete(self, **kwargs)

    monkeypatch.setattr(CkptflowStepOperator, "await_pod_completion", dies_once)
    monkeypatch.setattr(CkptflowStepOperator, "post_complete_action", no_cleanup_when_dead)
    dr, tis = run(dag)
    assert dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert lost and tis["convert"].try_number == 2
    convert_pods = [p for m, p, b in changes(server) if m == "POST" and p.endswith("/pods") and '"convert"' in b]
    assert len(convert_pods) == 1  # reattached: no second pod
    assert [c["argv"][0] for c in calls()].count("convert") == 1
    assert server.pods() == []


def test_an_api_server_restart_mid_pod_is_ridden_out(slow_convert, cluster):
    """The API server goes away for a second while convert's pod runs (its log stream and status polls cut): the step
    follows the same pod to its end, no second pod, no retry."""
    import threading
    import time

    server, dag, calls = cluster

    def restart_when_convert_runs():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pods = server.pods(namespace="ckptflow")
            if any(
                p["metadata"]["labels"].get("ckptflow/step") == "convert" and p["status"].get("phase") == "Running"
                for p in pods
            ):
                server.restart_api(downtime=1.0)
                restarted.append(True)
                return
            time.sleep(0.05)

    restarted: list = []
    watcher = threading.Thread(target=restart_when_convert_runs, daemon=True)
    watcher.start()
    dr, tis = run(dag)
    watcher.join(5)
    assert restarted and dr.state == "success", {k: ti.state for k, ti in tis.items()}
    assert tis["convert"].try_number == 1
    convert_pods = [p for m, p, b in changes(server) if m == "POST" and p.endswith("/pods") and '"convert"' in b]
    assert len(convert_pods) == 1 and [c["argv"][0] for c in calls()].count("convert") == 1

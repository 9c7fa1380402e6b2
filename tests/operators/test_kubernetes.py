"""Kubernetes mode without a cluster: every step's pod spec for a CPU and a TPU pool (and each part's pod when
download or convert runs in parts), validated strictly against the Kubernetes schema, running the local-mode
command, with no secret value anywhere in it; pod sizing (verify by the model's largest layer) and placement (no
step on a TPU while none computes there)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from types import SimpleNamespace

import kubernetes_validate
import pytest

from converters.core.registry import model_names
from converters.verify.sizing import verify_memory_bytes
from operators import kubernetes
from operators.commands import DOWNLOAD_FINALIZE, FINALIZE, STEPS, WorkLayout, step_args
from operators.kubernetes import (
    ACCELERATED_STEPS,
    NODE_POOLS,
    TPU_RESOURCE,
    VERIFY_MEMORY_MARGIN,
    KubernetesSettings,
    PodSizingError,
    WorkVolume,
    build_pod_operator,
    model_config,
    pod_manifest,
    step_resources,
)
from operators.pod_secret import secret_name

K8S_VERSIONS = ("1.33", "1.37")
SECRET = "hf_NEVERinAPodSpec_0123456789"
CONF = {
    "source": "meta-llama/Llama-3.1-8B",
    "revision": "main",
    "model": "llama3.1-8b",
    "destination": "file:///models/llama3.1-8b/v1",
    "execution_mode": "kubernetes",
}

KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters: [{name: fake, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: fake, user: {token: not-a-real-token}}]
contexts: [{name: fake, context: {cluster: fake, user: fake, namespace: ckptflow}}]
current-context: fake
"""


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Settings as a deployment sets them, with an HF token present everywhere a leak could come from."""
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text(KUBECONFIG)  # parsed, never contacted
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("AIRFLOW_CONN_CKPTFLOW_HF", json.dumps({"conn_type": "generic", "password": SECRET}))
    monkeypatch.setenv("CKPTFLOW_K8S_IMAGE", "europe-docker.pkg.dev/acme/ckptflow/converter:0.1.0")
    monkeypatch.setenv("CKPTFLOW_K8S_CONFIG_FILE", str(kubeconfig))
    return KubernetesSettings.from_env()


def context_for(dag, conf):
    """What a task's context holds for planning: the run's validated params, the DAG, the run id."""
    params = copy.deepcopy(dag.params)
    for key, value in conf.items():
        params[key] = value
    return {"params": params.validate(), "dag": dag, "run_id": "manual__2026-11-29T12:00:00+00:00"}


def step_operator(dag, task_id, part=0):
    """The operator a worker runs for `task_id`: a mapped step is unmapped for one part, as Airflow does."""
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    task = dag.get_task(task_id)
    return task.unmap({"part": part}) if isinstance(task, MappedOperator) else task


def render(dag, conf, settings, monkeypatch, dry_run=True):
    """{step: (pod dict, plan, pod operator)} for every step of the DAG."""
    out = {}
    for step in STEPS:
        op = step_operator(dag, step)
        monkeypatch.setattr(op, "kubernetes_settings", settings)
        context = context_for(dag, conf)
        context["ti"] = SimpleNamespace(dag_id=dag.dag_id, run_id=context["run_id"], task_id=op.task_id, map_index=-1)
        plan = op.plan(context)
        kpo = op.build_pod_operator(plan, context)
        if dry_run:
            pod = pod_manifest(kpo)
        else:
            from kubernetes.client import ApiClient

            pod = ApiClient().sanitize_for_serialization(kpo.build_pod_request_obj(None))
        out[step] = (pod, plan, kpo)
    return out


@pytest.mark.parametrize("pool", ["cpu-standard", "tpu-v5e-8"])
def test_pod_specs_validate_strictly_and_run_the_local_command(convert_dag, settings, pool, monkeypatch):
    pods = render(convert_dag, {**CONF, "node_pool": pool}, settings, monkeypatch)
    layout = WorkLayout.for_run(settings.mount_path, "convert_checkpoint", "manual__2026-11-29T12:00:00+00:00")
    for step, (pod, plan, kpo) in pods.items():
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)
        (container,) = pod["spec"]["containers"]
        # Same command as local mode: only the program in front differs (console script in the image).
        assert container["command"] == ["ckptflow"]
        assert container["args"] == step_args(step, plan.spec, layout) == plan.args
        assert container["image"] == settings.image
        assert {"name": "ckptflow-work", "mountPath": settings.mount_path} in container["volumeMounts"]
        assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "ckptflow-work"
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["spec"]["activeDeadlineSeconds"] == int(convert_dag.get_task(step).execution_timeout.total_seconds())
        assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
        # Pod lifecycle: deleted when done, room for node autoscaling, no XCom sidecar.
        assert kpo.on_finish_action.value == "delete_pod" and kpo.do_xcom_push is False
        assert len(pod["spec"]["containers"]) == 1
        assert kpo.schedule_timeout_seconds >= 1200
        # No secret value anywhere; the token is a secretKeyRef for the steps that talk to the hub.
        assert SECRET not in json.dumps(pod)
        refs = [e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e]
        # the token Secret of this task instance (operators.pod_secret), made from the Airflow connection
        name = secret_name("convert_checkpoint", "manual__2026-11-29T12:00:00+00:00", step)
        assert refs == ([{"name": name, "key": "token"}] if step in ("download", "publish") else [])

    # No step computes on a TPU (verify streams the models through the CPU): on a TPU preset every step, verify
    # included, runs on the CPU pool, with no TPU request, no TPU toleration and JAX on the CPU.
    assert ACCELERATED_STEPS == ()
    for step, (pod, _, kpo) in pods.items():
        assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-nodepool": "ckptflow-cpu"}, step
        assert TPU_RESOURCE not in json.dumps(pod) and not pod["spec"].get("tolerations"), step
        assert {"name": "JAX_PLATFORMS", "value": "cpu"} in pod["spec"]["containers"][0]["env"], step
        assert kpo.schedule_timeout_seconds == NODE_POOLS["cpu-standard"].schedule_timeout_seconds, step
    verify = pods["verify"][0]["spec"]["containers"][0]["resources"]
    assert verify["requests"]["memory"] == verify["limits"]["memory"] == "6Gi"  # llama3.1-8b, see the sizing test


def test_a_step_that_computes_on_an_accelerator_goes_to_the_tpu_slice(settings):
    """The placement machinery for a step that gains a TPU code path: its pod selects and tolerates the slice,
    requests its chips and lets JAX see the TPU; the other steps stay on the CPU companion."""
    tpu = dataclasses.replace(NODE_POOLS["tpu-v5e-8"], accelerated_steps=("verify",))
    built = {
        step: pod_manifest(
            build_pod_operator(
                task_id=step,
                step=step,
                args=[step],
                pool=tpu,
                model="llama3.1-8b",
                settings=settings,
                timeout_seconds=3600,
            )
        )
        for step in ("convert", "verify")
    }
    for pod in built.values():
        kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)
    spec = built["verify"]["spec"]
    assert spec["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "2x4",
    }
    resources = spec["containers"][0]["resources"]
    assert resources["limits"][TPU_RESOURCE] == resources["requests"][TPU_RESOURCE] == "8"
    assert {"key": TPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert {"name": "JAX_PLATFORMS", "value": "tpu,cpu"} in spec["containers"][0]["env"]
    assert built["convert"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-nodepool": "ckptflow-cpu"}
    assert TPU_RESOURCE not in json.dumps(built["convert"])


def test_pod_spec_with_a_kubeconfig_and_a_gcs_fuse_work_volume(convert_dag, settings, monkeypatch):
    settings = dataclasses.replace(settings, work_volume=WorkVolume("gcsfuse", bucket="acme-ckptflow", prefix="work"))
    pods = render(convert_dag, {**CONF, "node_pool": "cpu-highmem"}, settings, monkeypatch, dry_run=False)
    for step, (pod, plan, _) in pods.items():
        kubernetes_validate.validate(pod, K8S_VERSIONS[0], strict=True)
        assert pod["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
        assert pod["spec"]["volumes"][0]["csi"] == {
            "driver": "gcsfuse.csi.storage.gke.io",
            "volumeAttributes": {
                "bucketName": "acme-ckptflow",
                "mountOptions": "implicit-dirs,uid=1000,gid=0,only-dir=work",
            },
        }
        # non-root like the image, and the work volume writable by it
        assert pod["spec"]["securityContext"] == {
            "runAsUser": 1000,
            "runAsGroup": 0,
            "fsGroup": 0,
            "runAsNonRoot": True,
        }
        # The worker reads the steps' result files through object storage, at the matching gs:// URIs.
        assert plan.results[step].startswith("gs://acme-ckptflow/work/convert_checkpoint/")
    assert pods["convert"][1].outlets[0].startswith("gs://acme-ckptflow/work/")


def gib(quantity: str) -> int:
    return int(quantity.removesuffix("Gi"))


def test_memory_is_sized_per_step_and_model():
    cpu = NODE_POOLS["cpu-highmem"]
    small = {
        s: step_resources(s, cpu, "qwen3-0.6b")["requests"]["memory"] for s in (*STEPS, DOWNLOAD_FINALIZE, FINALIZE)
    }
    big = {
        s: step_resources(s, cpu, "llama3.1-70b")["requests"]["memory"] for s in (*STEPS, DOWNLOAD_FINALIZE, FINALIZE)
    }
    assert gib(big["verify"]) > gib(small["verify"])
    assert gib(big["convert"]) > gib(small["convert"])
    assert small["download"] == big["download"] and small["publish"] == big["publish"]
    assert small[FINALIZE] == big[FINALIZE]  # finalize moves files and writes the manifest: no tensors in memory
    assert small[DOWNLOAD_FINALIZE] == big[DOWNLOAD_FINALIZE] == small["download"]


def test_verify_is_sized_by_the_largest_layer_not_the_model():
    """verify streams both models layer by layer: its pod asks for the streaming estimate plus a margin, a
    fraction of the whole model in float32 that the pods used to ask for (2 x params x 4 bytes)."""
    cpu = NODE_POOLS["cpu-standard"]

    def verify_gib(model):
        return gib(step_resources("verify", cpu, model)["requests"]["memory"])

    for model in ("llama3.1-8b", "deepseek3-671b", "gemma3-27b"):
        want = math.ceil(verify_memory_bytes(model_config(model)) * VERIFY_MEMORY_MARGIN / 2**30)
        assert verify_gib(model) == want, model
    assert verify_gib("llama3.1-8b") == 6  # was 68 GiB
    assert verify_gib("llama3.1-405b") == 49  # was ~3 TiB: no pool could hold it
    assert verify_gib("deepseek3-671b") == 14  # a fraction of a standard CPU node
    assert verify_gib("deepseek3-671b") < verify_gib("llama3.1-70b")  # a larger model with smaller layers
    # Depth costs time, not memory: twice the layers, the same pod.
    cfg = model_config("llama3.1-70b")
    assert kubernetes.memory_gib("verify", {**cfg, "num_hidden_layers": 2 * cfg["num_hidden_layers"]}) == verify_gib(
        "llama3.1-70b"
    )
    # `auto` (no name) is sized as an 8B-class llama.
    assert step_resources("verify", cpu, None) == step_resources("verify", cpu, "llama3.1-8b")


def test_every_registry_model_is_sized_or_refused_clearly():
    """The form offers every registry model; each one gets requests on some pool or a clear refusal, and every step
    of every one of them fits the standard CPU pool (where a TPU preset sends them too)."""
    for model in model_names():
        for pool in NODE_POOLS.values():
            for step in (*STEPS, DOWNLOAD_FINALIZE, FINALIZE):
                try:
                    res = step_resources(step, pool, model)
                except PodSizingError:
                    assert pool.name != "cpu-standard", (model, step)
                    continue
                assert res["requests"]["memory"].endswith("Gi")


def test_a_pool_too_small_for_the_model_fails_at_once(convert_dag, settings, monkeypatch):
    small = dataclasses.replace(NODE_POOLS["cpu-standard"], allocatable_memory_gib=32)
    assert gib(step_resources("verify", small, "llama3.1-70b")["requests"]["memory"]) <= 32
    with pytest.raises(PodSizingError, match="choose a larger node pool"):
        step_resources("verify", small, "llama3.1-405b")
    from airflow.sdk.exceptions import AirflowFailException

    monkeypatch.setitem(NODE_POOLS, "cpu-standard", small)
    op = convert_dag.get_task("verify")
    monkeypatch.setattr(op, "kubernetes_settings", settings)
    plan = op.plan(context_for(convert_dag, {**CONF, "model": "llama3.1-405b", "node_pool": "cpu-standard"}))
    with pytest.raises(AirflowFailException, match="larger node pool"):
        op.build_pod_operator(plan)


def test_kubernetes_mode_needs_a_model_name(convert_dag, settings, monkeypatch):
    from airflow.sdk.exceptions import AirflowFailException

    op = step_operator(convert_dag, "convert")
    monkeypatch.setattr(op, "kubernetes_settings", settings)
    plan = op.plan(context_for(convert_dag, {**CONF, "model": "auto"}))
    with pytest.raises(AirflowFailException, match="instead of 'auto'"):
        op.build_pod_operator(plan)


def test_settings_from_environment():
    s = KubernetesSettings.from_env(
        {
            "CKPTFLOW_K8S_WORK_VOLUME": "gcsfuse",
            "CKPTFLOW_K8S_WORK_BUCKET": "b",
            "CKPTFLOW_K8S_NAMESPACE": "ml",
            "CKPTFLOW_K8S_IMAGE_PULL_SECRETS": "a, b",
            "CKPTFLOW_K8S_IN_CLUSTER": "true",
        }
    )
    assert s.work_volume == WorkVolume("gcsfuse", bucket="b") and s.namespace == "ml"
    assert s.image_pull_secrets == ("a", "b") and s.in_cluster is True
    with pytest.raises(ValueError, match="needs a bucket"):
        KubernetesSettings.from_env({"CKPTFLOW_K8S_WORK_VOLUME": "gcsfuse"})


POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # a DNS-1123 label


@pytest.mark.parametrize("step, finalize_step", [("download", DOWNLOAD_FINALIZE), ("convert", FINALIZE)])
@pytest.mark.parametrize("pool", ["cpu-highmem", "tpu-v6e-8"])
def test_pod_specs_of_a_step_in_parts(convert_dag, settings, pool, monkeypatch, step, finalize_step):
    """Each part is a pod of its own (distinct name, its part's command, the whole step's sizing, the shared work
    volume), then one finalize pod; all validate strictly, and the download's all get the HF token reference."""
    conf = {**CONF, "node_pool": pool, "parts": 3}
    whole = render(convert_dag, {**conf, "parts": 1}, settings, monkeypatch)[step][0]["spec"]
    layout = WorkLayout.for_run(settings.mount_path, "convert_checkpoint", "manual__2026-11-29T12:00:00+00:00")
    pods = {}
    ops = [(i, step_operator(convert_dag, step, i)) for i in range(3)] + [
        (finalize_step, convert_dag.get_task(finalize_step))
    ]
    for key, op in ops:
        monkeypatch.setattr(op, "kubernetes_settings", settings)
        context = context_for(convert_dag, conf)
        map_index = key if isinstance(key, int) else -1
        context["ti"] = SimpleNamespace(
            dag_id="convert_checkpoint", run_id=context["run_id"], task_id=op.task_id, map_index=map_index
        )
        plan = op.plan(context)
        pods[key] = (pod_manifest(op.build_pod_operator(plan, context)), plan)
    names = set()
    for key, (pod, plan) in pods.items():
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(pod, version, strict=True)
        (container,) = pod["spec"]["containers"]
        is_part = key != finalize_step
        want = step_args(step, plan.spec, layout, key) if is_part else step_args(finalize_step, plan.spec, layout)
        assert container["args"] == plan.args == want
        tail = ["--part", f"{key}/3"] if is_part else ["--finalize"]
        assert container["args"][-len(tail) :] == tail
        name = pod["metadata"]["name"]
        assert POD_NAME.match(name) and len(name) <= 63, name
        assert name.startswith(
            f"ckptflow-{step}-part-{key}-" if is_part else f"ckptflow-{finalize_step.replace('_', '-')}-"
        ), name
        names.add(name)
        # The same work volume at the same path as every other step: parts stage beside OUT on it.
        assert pod["spec"]["volumes"][0] == whole["volumes"][0]
        assert {"name": "ckptflow-work", "mountPath": settings.mount_path} in container["volumeMounts"]
        assert pod["spec"]["nodeSelector"] == {
            "cloud.google.com/gke-nodepool": "ckptflow-cpu-highmem" if pool == "cpu-highmem" else "ckptflow-cpu"
        }
        assert TPU_RESOURCE not in json.dumps(pod) and SECRET not in json.dumps(pod)
        # Every part of a download and its finalize fetch from the hub: the token as a reference, never a value.
        refs = [e["valueFrom"]["secretKeyRef"] for e in container.get("env", []) if "valueFrom" in e]
        # each part's own Secret (its task instance's)
        task_id, map_index = (step, key) if is_part else (finalize_step, -1)
        name = secret_name("convert_checkpoint", "manual__2026-11-29T12:00:00+00:00", task_id, map_index)
        assert refs == ([{"name": name, "key": "token"}] if step == "download" else []), key
        if is_part:
            assert pod["metadata"]["labels"]["ckptflow/part"] == str(key)
            assert pod["metadata"]["labels"]["ckptflow/step"] == step
            assert container["resources"] == whole["containers"][0]["resources"]  # sized like the whole step
            assert pod["spec"]["activeDeadlineSeconds"] == whole["activeDeadlineSeconds"]
    assert len(names) == 4
    finalize = pods[finalize_step][0]
    assert finalize["spec"]["activeDeadlineSeconds"] == int(
        convert_dag.get_task(finalize_step).execution_timeout.total_seconds()
    )
    assert "ckptflow/part" not in finalize["metadata"]["labels"]
    assert finalize["metadata"]["labels"]["ckptflow/step"] == finalize_step


@pytest.mark.parametrize("finalize_step", [DOWNLOAD_FINALIZE, FINALIZE])
def test_a_finalize_of_a_run_in_one_part_runs_no_pod(convert_dag, settings, monkeypatch, finalize_step):
    op = convert_dag.get_task(finalize_step)
    monkeypatch.setattr(op, "kubernetes_settings", settings)
    plan = op.plan(context_for(convert_dag, CONF))
    assert plan.args == [] and plan.outlets == []  # execute() returns before building a pod


def test_a_cluster_synced_token_secret_is_referenced_instead(convert_dag, settings, monkeypatch):
    """`CKPTFLOW_K8S_HF_TOKEN_SECRET`: where Airflow may not create Secrets, download and publish reference the one the
    cluster keeps in sync with the connection (optional: public repos need none), and no per-pod Secret is made."""
    monkeypatch.setenv("CKPTFLOW_K8S_HF_TOKEN_SECRET", "ckptflow-hf-synced")
    synced = KubernetesSettings.from_env()
    pods = render(convert_dag, CONF, synced, monkeypatch)
    for step, (pod, _, _) in pods.items():
        env = pod["spec"]["containers"][0].get("env", [])
        refs = [e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e]
        want = [{"name": "ckptflow-hf-synced", "key": "token", "optional": True}]
        assert refs == (want if step in ("download", "publish") else []), step
        assert SECRET not in json.dumps(pod)
    op = step_operator(convert_dag, "download")
    monkeypatch.setattr(op, "kubernetes_settings", synced)
    assert not op._needs_token()

"""docs/deploy.md stays true to the code: its Kubernetes manifests validate against the Kubernetes schema, the
chart values parse, and every setting, node pool and name it mentions exists."""

from __future__ import annotations

import re

import yaml
from dockerfiles import REPO

DOC = (REPO / "docs" / "deploy.md").read_text()


def yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", DOC, flags=re.S)


def test_manifests_validate_against_kubernetes_1_33():
    import kubernetes_validate

    kinds = []
    for block in yaml_blocks():
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                kubernetes_validate.validate(doc, "1.33", strict=True)
                kinds.append(doc["kind"])
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Job"} <= set(kinds)


def test_chart_values_use_real_settings():
    from operators.kubernetes import KubernetesSettings

    (values,) = [yaml.safe_load(b) for b in yaml_blocks() if "executor:" in b]
    env = {e["name"]: e["value"] for e in values["env"]}
    settings = KubernetesSettings.from_env(env)
    assert settings.namespace == "ckptflow" and settings.service_account == "ckptflow" and settings.in_cluster is True
    assert settings.work_volume.kind == "pvc" and settings.work_volume.claim == "ckptflow-work"
    assert settings.image.endswith("ckptflow-converter:0.1.0")
    assert values["airflowVersion"] == values_pin("apache-airflow")
    mount = values["apiServer"]["extraVolumeMounts"][0]
    assert (
        mount["mountPath"] == settings.mount_path
        and {"name": "CKPTFLOW_UI_WORK_MOUNT", "value": settings.mount_path} in values["apiServer"]["env"]
    )


def values_pin(name: str) -> str:
    from dockerfiles import AIRFLOW, pins

    return pins(AIRFLOW)[name][0]


def test_every_setting_and_node_pool_named_exists():
    from operators.kubernetes import NODE_POOLS

    code = (REPO / "operators" / "kubernetes.py").read_text()
    k8s_settings = {f"CKPTFLOW_K8S_{k}" for k in re.findall(r'get\("(\w+)"', code)}
    ui_code = "".join(p.read_text() for p in (REPO / "plugins").rglob("*.py"))
    for name in set(re.findall(r"CKPTFLOW_K8S_\w+", DOC)):
        assert name in k8s_settings, name
    for name in set(re.findall(r"CKPTFLOW_UI_\w+", DOC)):
        assert name in ui_code, name
    for preset in re.findall(r"\b(tpu-v\w+-\d+|cpu-standard|cpu-highmem)\b", DOC):
        assert preset in NODE_POOLS, preset
    for pool in NODE_POOLS.values():  # the CPU pools the presets select exist in the doc's commands
        for label, value in pool.node_selector.items():
            if label == "cloud.google.com/gke-nodepool":
                assert f"node-pools create {value} " in DOC, value

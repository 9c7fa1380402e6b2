"""The HF token handed to a step's pod: one Secret per task instance, made from the Airflow connection.

The Airflow connection (`ckptflow_hf`) is the one place the token lives. For a step that needs it (download,
publish) in kubernetes mode, the operator writes it into a Secret of the pod's namespace just before creating the
pod; the pod reads it as `HF_TOKEN` through `secretKeyRef`, so the value is never part of the pod spec, the rendered
template fields, the command, a log line or an XCom. Once the pod exists the Secret is made the pod's dependent
(an ownerReference): when the pod is deleted -- by the operator, by `on_kill`, or by anyone -- Kubernetes' garbage
collector deletes the Secret too, even if the worker died meanwhile. The operator also deletes it itself when the
pod is done.

The name depends only on the task instance (DAG, run, task, map index), not on the try: a retry that reattaches to
its running pod finds the Secret that pod reads.
"""

from __future__ import annotations

import hashlib

from kubernetes.client import models as k8s
from kubernetes.client.exceptions import ApiException

from operators.kubernetes import HF_TOKEN_KEY


def secret_name(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """A DNS-label name for the task instance's token Secret (no run id or task name in clear: they may be long)."""
    digest = hashlib.sha256(f"{dag_id}\0{run_id}\0{task_id}\0{map_index}".encode()).hexdigest()
    return f"ckptflow-hf-token-{digest[:20]}"


def create(client, namespace: str, name: str, token: str, labels: dict[str, str]) -> None:
    """Create (or replace, on a retry) the Secret holding `token` under key `token`."""
    body = k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=labels),
        string_data={HF_TOKEN_KEY: token},
        type="Opaque",
    )
    try:
        client.create_namespaced_secret(namespace, body)
    except ApiException as e:
        if e.status != 409:
            raise
        client.replace_namespaced_secret(name, namespace, body)


def adopt(client, namespace: str, name: str, pod) -> None:
    """Make the Secret a dependent of `pod` (deleted with it by the garbage collector)."""
    meta = pod.metadata
    owner = {"apiVersion": "v1", "kind": "Pod", "name": meta.name, "uid": meta.uid, "blockOwnerDeletion": False}
    client.patch_namespaced_secret(name, namespace, {"metadata": {"ownerReferences": [owner]}})


def delete(client, namespace: str, name: str) -> None:
    """Delete the Secret; already gone (the garbage collector, an earlier try) is fine."""
    try:
        client.delete_namespaced_secret(name, namespace)
    except ApiException as e:
        if e.status != 404:
            raise

"""Kubernetes execution: the same `ckptflow` command in a pod of the converter image, on a GKE node pool.

* Node-pool presets (`NODE_POOLS`): CPU pools by `cloud.google.com/gke-nodepool`, TPU slices by
  `cloud.google.com/gke-tpu-accelerator` / `cloud.google.com/gke-tpu-topology` with `google.com/tpu` limits
  and the matching toleration. On a TPU preset only the steps that compute on an accelerator
  (`ACCELERATED_STEPS`) go to the TPU nodes, the others to the preset's CPU companion pool. No step does today:
  verify streams both models through the CPU (JAX forced to CPU), so on a TPU preset every step, verify
  included, runs on `cpu-standard`.
* Requests per step and model (`step_resources`): memory from the model's published config (in
  `converters.core.registry`), checked against what the pool's nodes can hold so a too-small pool fails at
  once instead of waiting for a node that can never fit the pod. Convert follows the model's largest tensor,
  verify its largest layer (`converters.verify.sizing`); the other steps hold no tensors.
* A shared work volume (`WorkVolume`: a PVC, or a GCS bucket through the GCS FUSE CSI driver) mounted at the
  same path in every step's pod: steps hand results on through files there, never through an XCom sidecar.
* Credentials only as references: `HF_TOKEN` from a Kubernetes secret (`secretKeyRef`), Google access
  through the pod's service account (Workload Identity) or an optional key-file secret volume. No secret
  value is ever part of the command, the pod spec or anything Airflow renders.
* Pods are deleted when they finish; `schedule_timeout_seconds` leaves room for node autoscaling (a TPU
  slice can take many minutes to appear); `active_deadline_seconds` bounds a pod to its step's timeout.

Settings come from `CKPTFLOW_K8S_*` environment variables read when a task runs (`KubernetesSettings`),
never at DAG parse time. The Kubernetes provider is imported only when a pod is built.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from operators.commands import CREDENTIAL_STEPS, POD_ENTRYPOINT, STEP_ENV

if TYPE_CHECKING:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

GiB = 1024**3
NODEPOOL_LABEL = "cloud.google.com/gke-nodepool"
TPU_ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
TPU_RESOURCE = "google.com/tpu"
GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"
POD_UID, POD_GID = 1000, 0  # the converter image's user (docker/converter.Dockerfile)
WORK_VOLUME_NAME = "ckptflow-work"
HF_TOKEN_KEY = "token"  # the key of the HF token in its Secret


# Steps that compute on an accelerator when their node pool has one; on a TPU preset the others run on its CPU
# companion. Empty: verify streams both models layer by layer on the CPU, where a TPU slice would sit idle. A step
# that gains an accelerator code path is added here (and gets `google.com/tpu` and `JAX_PLATFORMS=tpu,cpu`). The
# TPU presets stay, so that runs and watchlist targets naming them keep working (on cpu-standard).
ACCELERATED_STEPS: tuple[str, ...] = ()


class PodSizingError(ValueError):
    """The step needs more than the chosen node pool's nodes can give."""


@dataclass(frozen=True)
class NodePool:
    name: str
    description: str
    node_selector: dict[str, str]
    # What one node can give a pod (a bit under the machine's size): used to size requests and fail early.
    allocatable_cpu: float
    allocatable_memory_gib: int
    tpu_chips: int = 0
    accelerated_steps: tuple[str, ...] = ()
    # Step pods that do not use the accelerator run on this (CPU) preset instead.
    cpu_companion: str | None = None
    schedule_timeout_seconds: int = 20 * 60

    @property
    def is_tpu(self) -> bool:
        return self.tpu_chips > 0

    def tolerations(self) -> list[dict[str, str]]:
        if not self.is_tpu:
            return []
        return [{"key": TPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


def _tpu(name: str, slice_: str, accelerator: str, topology: str, chips: int, cpu: float, mem_gib: int) -> NodePool:
    if ACCELERATED_STEPS:
        use = f"for {', '.join(ACCELERATED_STEPS)}; the other steps run on cpu-standard"
    else:  # the form says so: choosing a TPU preset changes nothing today
        use = "unused: no step computes on a TPU yet (verify runs on the CPU), every step runs on cpu-standard"
    return NodePool(
        name=name,
        description=f"{slice_}, {use}",
        node_selector={TPU_ACCELERATOR_LABEL: accelerator, TPU_TOPOLOGY_LABEL: topology},
        allocatable_cpu=cpu,
        allocatable_memory_gib=mem_gib,
        tpu_chips=chips,
        accelerated_steps=ACCELERATED_STEPS,
        cpu_companion="cpu-standard",
        # A TPU slice is often created on demand by the node autoscaler: allow an hour to schedule.
        schedule_timeout_seconds=60 * 60,
    )


NODE_POOLS: dict[str, NodePool] = {
    p.name: p
    for p in (
        NodePool(
            "cpu-standard",
            "CPU node pool `ckptflow-cpu` (n2-highmem-16: 16 vCPU, 128 GiB): every step of the registry's models",
            {NODEPOOL_LABEL: "ckptflow-cpu"},
            allocatable_cpu=15,
            allocatable_memory_gib=110,
        ),
        NodePool(
            "cpu-highmem",
            "CPU node pool `ckptflow-cpu-highmem` (n2-highmem-80: 80 vCPU, 640 GiB): headroom beyond what the "
            "registry's models need",
            {NODEPOOL_LABEL: "ckptflow-cpu-highmem"},
            allocatable_cpu=78,
            allocatable_memory_gib=600,
            schedule_timeout_seconds=30 * 60,
        ),
        _tpu("tpu-v5e-8", "TPU v5e 2x4 slice (8 chips)", "tpu-v5-lite-podslice", "2x4", 8, 200, 340),
        _tpu("tpu-v6e-8", "TPU v6e 2x4 slice (8 chips)", "tpu-v6e-slice", "2x4", 8, 170, 1300),
        _tpu("tpu-v5p-8", "TPU v5p 2x2x1 slice (4 chips)", "tpu-v5p-slice", "2x2x1", 4, 200, 400),
    )
}


def node_pool(name: str) -> NodePool:
    try:
        return NODE_POOLS[name]
    except KeyError:
        raise ValueError(f"unknown node pool {name!r}; presets: {', '.join(NODE_POOLS)}") from None


def pool_for_step(pool: NodePool, step: str) -> NodePool:
    if step in pool.accelerated_steps or pool.cpu_companion is None:
        return pool
    return node_pool(pool.cpu_companion)


@dataclass(frozen=True)
class WorkVolume:
    """The volume every step's pod mounts at `mount_path`: a PVC (`claim`) or a GCS bucket via GCS FUSE."""

    kind: str  # "pvc" or "gcsfuse"
    claim: str | None = None
    bucket: str | None = None
    prefix: str = ""  # gcsfuse: the folder of the bucket that is mounted (only-dir)

    def __post_init__(self):
        if self.kind == "pvc" and not self.claim:
            raise ValueError("a pvc work volume needs a claim name")
        if self.kind == "gcsfuse" and not self.bucket:
            raise ValueError("a gcsfuse work volume needs a bucket")
        if self.kind not in ("pvc", "gcsfuse"):
            raise ValueError(f"work volume kind must be pvc or gcsfuse, got {self.kind!r}")

    def csi_attributes(self) -> dict[str, str]:
        """GCS FUSE CSI volume attributes (`implicit-dirs` so folders written by other pods are visible)."""
        # the converter image runs as uid 1000, gid 0: the FUSE mount must be theirs or steps cannot write
        options = ["implicit-dirs", f"uid={POD_UID}", f"gid={POD_GID}"]
        if self.prefix.strip("/"):
            options.append(f"only-dir={self.prefix.strip('/')}")
        return {"bucketName": self.bucket, "mountOptions": ",".join(options)}

    def pod_annotations(self) -> dict[str, str]:
        return {"gke-gcsfuse/volumes": "true"} if self.kind == "gcsfuse" else {}

    def uri(self, mount_path: str, path: str) -> str:
        """How Airflow names a file of this volume (asset URIs; reading results back on the worker)."""
        rel = os.path.relpath(path, mount_path)
        if self.kind == "gcsfuse":
            prefix = self.prefix.strip("/")
            return f"gs://{self.bucket}/{prefix + '/' if prefix else ''}{rel}"
        return f"pvc://{self.claim}/{rel}"


@dataclass(frozen=True)
class KubernetesSettings:
    """Where and how step pods run. `from_env()` reads `CKPTFLOW_K8S_*` when a task runs."""

    image: str = "ckptflow-converter:latest"
    namespace: str = "ckptflow"
    work_volume: WorkVolume = field(default_factory=lambda: WorkVolume("pvc", claim="ckptflow-work"))
    mount_path: str = "/ckptflow-work"
    service_account: str | None = "ckptflow"
    # A Kubernetes Secret kept in sync with the HF token by the cluster's own tooling (key `token`), for deployments
    # where Airflow may not create Secrets; None: the operator hands the `ckptflow_hf` connection's token to each pod
    # in a Secret of its own (`operators.pod_secret`)
    hf_token_secret: str | None = None
    gcp_key_secret: str | None = None  # optional key-file secret (prefer Workload Identity)
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    kubernetes_conn_id: str | None = None
    config_file: str | None = None
    in_cluster: bool | None = None
    startup_timeout_seconds: int = 15 * 60  # pulling a multi-GB image onto a fresh node

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> KubernetesSettings:
        env = os.environ if env is None else env
        get = lambda k, d=None: env.get(f"CKPTFLOW_K8S_{k}") or d  # noqa: E731
        kind = get("WORK_VOLUME", "pvc")
        volume = WorkVolume(
            kind,
            claim=get("WORK_PVC", "ckptflow-work") if kind == "pvc" else None,
            bucket=get("WORK_BUCKET") if kind == "gcsfuse" else None,
            prefix=get("WORK_PREFIX", "") if kind == "gcsfuse" else "",
        )
        in_cluster = get("IN_CLUSTER")
        return cls(
            image=get("IMAGE", cls.image),
            namespace=get("NAMESPACE", cls.namespace),
            work_volume=volume,
            mount_path=get("MOUNT_PATH", cls.mount_path),
            service_account=get("SERVICE_ACCOUNT", cls.service_account),
            hf_token_secret=get("HF_TOKEN_SECRET", cls.hf_token_secret),
            gcp_key_secret=get("GCP_KEY_SECRET"),
            image_pull_policy=get("IMAGE_PULL_POLICY", cls.image_pull_policy),
            image_pull_secrets=tuple(x.strip() for x in (get("IMAGE_PULL_SECRETS", "") or "").split(",") if x.strip()),
            kubernetes_conn_id=get("CONN_ID"),
            config_file=get("CONFIG_FILE"),
            in_cluster=None if in_cluster is None else in_cluster.lower() in ("1", "true", "yes"),
        )


# --------------------------------------------------------------------------------------------- sizing


def _text_config(config: dict) -> dict:
    """The language model's config (multimodal configs nest it under `text_config`)."""
    return config if "hidden_size" in config else config.get("text_config") or config


def _experts(c: dict) -> tuple[int, int]:
    """(number of experts, each expert's intermediate size); (0, 0) for a dense model."""
    experts = int(c.get("num_local_experts") or c.get("num_experts") or 0)
    return experts, int(c.get("moe_intermediate_size") or c["intermediate_size"]) if experts else 0


def largest_tensor_elements(config: dict) -> int:
    """Elements of the largest array `ckptflow convert` holds at once: the embedding, an MLP kernel, or
    all experts of one layer."""
    c = _text_config(config)
    h, vocab = int(c["hidden_size"]), int(c["vocab_size"])
    experts, expert_inter = _experts(c)
    # dense MLP widths: Qwen3.5 has only a shared expert's, Llama 4 Maverick's dense layers their own
    dense = (c.get(k) for k in ("intermediate_size", "intermediate_size_mlp", "shared_expert_intermediate_size"))
    return max(vocab * h, h * max(int(x or 0) for x in dense), experts * h * expert_inter)


# Per step: CPU request, fixed memory, and what grows with the model. `ckptflow convert` streams one array
# (or one layer slice) at a time with 2 workers, computing in float32: a few copies of the largest tensor.
# `ckptflow verify` streams both models one layer at a time (experts one by one, embedding and LM head in row
# blocks), so it follows the largest layer, not the model's size: `converters.verify.sizing` (a 1.5 GiB base
# + 3 float32 copies of the largest layer + 12 of one expert + 2 of the arrays read whole + row blocks and
# activations), times VERIFY_MEMORY_MARGIN; it has no fixed part here.
# Finalize of a split convert moves the parts' files into place and writes the manifest: no tensors in memory.
# Each part of a split download and its finalize (checks, small files, moves) are sized like a whole download.
_STEP_CPU = {"download": 2.0, "download_finalize": 2.0, "convert": 8.0, "finalize": 4.0, "verify": 8.0, "publish": 2.0}
_BASE_GIB = {"download": 4, "download_finalize": 4, "convert": 8, "finalize": 8, "publish": 4}
# The verify estimate stays above the peaks measured so far (docs/performance.md, "Verify"), but the memory limit
# equals the request (an overrun is an OOM kill): a quarter more.
VERIFY_MEMORY_MARGIN = 1.25
VERIFY_DTYPE = "float32"  # the DAG's verify runs at `ckptflow verify`'s default dtype
_DEFAULT_CONFIG = {  # sizing stand-in when the model is "auto": an 8B-class model
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
}


def memory_gib(step: str, config: dict) -> int:
    if step == "verify":
        from converters.verify.sizing import verify_memory_bytes  # light, but only needed when a pod is sized

        return math.ceil(verify_memory_bytes(config, dtype=VERIFY_DTYPE) * VERIFY_MEMORY_MARGIN / GiB)
    base = _BASE_GIB[step]
    if step == "convert":
        return base + math.ceil(3 * largest_tensor_elements(config) * 4 / GiB)
    return base


def model_config(model: str | None) -> dict:
    """The published HF config of a registry model name; an 8B-class stand-in for `auto`/unknown."""
    if not model:
        return dict(_DEFAULT_CONFIG)
    from converters.core.registry import model as registry_model

    return registry_model(model)[1]


def step_resources(step: str, pool: NodePool, model: str | None) -> dict[str, dict[str, str]]:
    """Requests and limits of a step's container on `pool` (already the pool the step runs on)."""
    mem = memory_gib(step, model_config(model))
    if mem > pool.allocatable_memory_gib:
        raise PodSizingError(
            f"{step} of {model or 'this model'} needs about {mem} GiB of memory but a node of pool "
            f"{pool.name!r} gives at most {pool.allocatable_memory_gib} GiB; choose a larger node pool"
        )
    cpu = _STEP_CPU[step]
    if pool.is_tpu:
        cpu = max(cpu, min(32.0, pool.allocatable_cpu))  # feed the chips: host-side input and weight staging
    cpu = min(cpu, pool.allocatable_cpu)
    requests = {"cpu": f"{cpu:g}", "memory": f"{mem}Gi"}
    limits = {"memory": f"{mem}Gi"}  # no CPU limit (no throttling); memory limit = request (no surprise OOM kills)
    if pool.is_tpu and step in pool.accelerated_steps:
        requests[TPU_RESOURCE] = limits[TPU_RESOURCE] = str(pool.tpu_chips)
    return {"requests": requests, "limits": limits}


# ------------------------------------------------------------------------------------------ pod building


# How every step pod is run, whatever the step: deleted when done or killed, logs streamed into the task log, no
# XCom sidecar (results are files on the work volume), a random suffix so retries never clash by name.
POD_OPERATOR_OPTIONS = {
    "on_finish_action": "delete_pod",
    "on_kill_action": "delete_pod",
    "do_xcom_push": False,
    "get_logs": True,
    "log_events_on_failure": True,
    "random_name_suffix": True,
}


def pod_fields(
    *,
    step: str,
    args: list[str],
    pool: NodePool,
    model: str | None,
    settings: KubernetesSettings,
    timeout_seconds: int | None,
    labels: dict[str, str] | None = None,
    part: int | None = None,
    hf_token_secret: str | None = None,
    hf_token_optional: bool = False,
) -> dict:
    """The `KubernetesPodOperator` arguments of one step's pod, running `ckptflow <args>`: `part` names the pod of one
    part of a split download or convert (each part is a pod of its own, sized like the whole step);
    `hf_token_secret` is the Secret (key `token`) the pod reads `HF_TOKEN` from, when the step needs it (`optional`: a
    cluster-synced Secret that may be absent, for public repos)."""
    from kubernetes.client import models as k8s

    step_pool = pool_for_step(pool, step)
    accelerated = step_pool.is_tpu and step in step_pool.accelerated_steps
    env = [k8s.V1EnvVar(name=k, value=v) for k, v in STEP_ENV.items()]
    env.append(k8s.V1EnvVar(name="JAX_PLATFORMS", value="tpu,cpu" if accelerated else "cpu"))
    if hf_token_secret and step in CREDENTIAL_STEPS:
        ref = k8s.V1SecretKeySelector(name=hf_token_secret, key=HF_TOKEN_KEY, optional=hf_token_optional or None)
        env.append(k8s.V1EnvVar(name="HF_TOKEN", value_from=k8s.V1EnvVarSource(secret_key_ref=ref)))
    wv = settings.work_volume
    if wv.kind == "pvc":
        volume = k8s.V1Volume(
            name=WORK_VOLUME_NAME, persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=wv.claim)
        )
    else:
        volume = k8s.V1Volume(
            name=WORK_VOLUME_NAME,
            csi=k8s.V1CSIVolumeSource(driver=GCSFUSE_DRIVER, volume_attributes=wv.csi_attributes()),
        )
    volumes = [volume]
    mounts = [k8s.V1VolumeMount(name=WORK_VOLUME_NAME, mount_path=settings.mount_path)]
    if settings.gcp_key_secret:
        volumes.append(
            k8s.V1Volume(name="gcp-key", secret=k8s.V1SecretVolumeSource(secret_name=settings.gcp_key_secret))
        )
        mounts.append(k8s.V1VolumeMount(name="gcp-key", mount_path="/var/secrets/google", read_only=True))
        env.append(k8s.V1EnvVar(name="GOOGLE_APPLICATION_CREDENTIALS", value="/var/secrets/google/key.json"))
    res = step_resources(step, step_pool, model)
    # a pod name is a DNS label: no underscores (download_finalize)
    name = f"ckptflow-{step.replace('_', '-')}"
    labels = {"app.kubernetes.io/name": "ckptflow", "ckptflow/step": step, **(labels or {})}
    if part is not None:
        name, labels["ckptflow/part"] = f"{name}-part-{part}", str(part)
    return {
        "name": name,
        "namespace": settings.namespace,
        "image": settings.image,
        "image_pull_policy": settings.image_pull_policy,
        "image_pull_secrets": [k8s.V1LocalObjectReference(name=n) for n in settings.image_pull_secrets],
        "cmds": list(POD_ENTRYPOINT),
        "arguments": list(args),
        "env_vars": env,
        "container_resources": k8s.V1ResourceRequirements(requests=res["requests"], limits=res["limits"]),
        "node_selector": dict(step_pool.node_selector),
        "tolerations": [k8s.V1Toleration(**t) for t in step_pool.tolerations()],
        "volumes": volumes,
        "volume_mounts": mounts,
        # non-root as the image; fsGroup makes a PVC work volume group-writable for it
        "security_context": {"runAsUser": POD_UID, "runAsGroup": POD_GID, "fsGroup": POD_GID, "runAsNonRoot": True},
        "labels": labels,
        "annotations": wv.pod_annotations(),
        "service_account_name": settings.service_account,
        "schedule_timeout_seconds": step_pool.schedule_timeout_seconds,
        "startup_timeout_seconds": settings.startup_timeout_seconds,
        "active_deadline_seconds": timeout_seconds,
        "kubernetes_conn_id": settings.kubernetes_conn_id,
        "config_file": settings.config_file,
        "in_cluster": settings.in_cluster,
    }


def build_pod_operator(*, task_id: str, **fields) -> KubernetesPodOperator:
    """A plain `KubernetesPodOperator` with a step pod's arguments (`pod_fields`), e.g. to render its manifest."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    return KubernetesPodOperator(task_id=task_id, **pod_fields(**fields), **POD_OPERATOR_OPTIONS, retries=0)


def container_exit_code(pod, container: str = "base") -> int | None:
    """Exit status of a finished pod's container (None when it never ran to an end)."""
    for status in getattr(getattr(pod, "status", None), "container_statuses", None) or []:
        if status.name == container and status.state is not None and status.state.terminated is not None:
            return status.state.terminated.exit_code
    return None


def pod_manifest(kpo: KubernetesPodOperator, context=None) -> dict:
    """The pod the operator would create, as the JSON dict sent to the API server (no cluster needed)."""
    from kubernetes.client import ApiClient

    pod = kpo.build_pod_request_obj(context, dry_run=True)
    return ApiClient().sanitize_for_serialization(pod)

"""A Kubernetes API stand-in on 127.0.0.1 whose "kubelet" runs each pod's containers as local processes.

The real `kubernetes` and `kubernetes_asyncio` clients (and through them the cncf.kubernetes provider's
KubernetesPodOperator, PodManager, AsyncKubernetesHook and KubernetesPodTrigger) talk to it through a kubeconfig
(`KubeApiServer.kubeconfig`) exactly as to a cluster: plain HTTP (or HTTPS with `tls=True`: a self-signed
certificate for 127.0.0.1 made with the `openssl` CLI, `ca_cert`, in the kubeconfig as certificate-authority-data, as
a GKE cluster's endpoint and CA would be), a bearer token, core/v1 JSON.

API (core/v1 only; every object carries apiVersion/kind/metadata with uid, resourceVersion, creationTimestamp):

    GET  /version /api /api/v1 /apis /healthz /livez /readyz    discovery enough for the clients
    GET  /api/v1/namespaces[/{ns}]  POST /api/v1/namespaces      namespaces (creating anything in a missing one: 404)
    GET  /api/v1/nodes[/{name}]                                  the configured nodes (`Node`), for information
    GET|POST                /api/v1/namespaces/{ns}/{kind}       list (labelSelector, fieldSelector, limit/continue,
                                                                 watch=true, resourceVersion, timeoutSeconds) / create
    DELETE                  /api/v1/namespaces/{ns}/{kind}       deletecollection (labelSelector, fieldSelector)
    GET|PUT|PATCH|DELETE    /api/v1/namespaces/{ns}/{kind}/{name}
    GET  /api/v1/{kind}                                          list (and watch) across namespaces
        kind: pods, secrets, configmaps, events
    GET  /api/v1/namespaces/{ns}/pods/{name}/status              read_namespaced_pod_status
    GET  /api/v1/namespaces/{ns}/pods/{name}/log                 container, follow (chunked until the container
                                                                 ends), timestamps (RFC 3339 nano), sinceSeconds,
                                                                 sinceTime, tailLines, limitBytes, previous
    *    /api/v1/namespaces/{ns}/pods/{name}/exec|attach|portforward   400 "Upgrade request required" (no websockets)

PATCH takes application/merge-patch+json, application/strategic-merge-patch+json (treated as a merge patch: the
stand-in has no list merge keys; pods only accept metadata changes anyway) and application/json-patch+json; pods,
like on a real API server, refuse spec changes (422). Errors are `Status` objects with code/reason/details:
400 BadRequest, 401 Unauthorized, 404 NotFound, 405 MethodNotAllowed, 409 AlreadyExists/Conflict, 415, 422 Invalid.
`dryRun=All` validates without storing. Secrets' `stringData` is folded into base64 `data` as the API server does.

The kubelet (one thread per pod, `_PodRun`):
  * scheduling: the pod goes to the first configured `Node` whose labels satisfy `nodeSelector` and required
    `nodeAffinity` terms (In/NotIn/Exists/DoesNotExist/Gt/Lt, matchFields metadata.name), whose taints
    (NoSchedule/NoExecute) the pod tolerates and whose allocatable has every resource the pod requests (extended
    resources such as google.com/tpu must be listed; quantities are compared per pod, not summed over pods).
    Otherwise the pod stays Pending with PodScheduled=False reason Unschedulable and a Warning FailedScheduling
    event; `set_nodes`/`add_node_labels` reschedule waiting pods, as a cluster autoscaler would.
  * then volumes are set up as local folders under the workdir: emptyDir -> a fresh folder per pod (removed with the
    pod), hostPath -> the path as is, persistentVolumeClaim -> `pvc/{ns}/{claim}` (shared across pods, kept; no
    PVC objects needed), csi (e.g. GCS FUSE) -> `csi/{driver}/{bucketName}[/{only-dir}]` (shared, kept),
    secret / configMap -> files written from the stored object (items, defaultMode, optional); a missing secret or
    configmap keeps the pod in ContainerCreating with FailedMount events until it appears. Other volume types are
    served as empty folders with a Warning event. `pvc_path()` / `csi_path()` name the shared folders.
  * init containers run one after another, then all containers together, each as a LOCAL PROCESS (its own session /
    process group, stdout+stderr interleaved into one log as a node captures them, a timestamp per line). argv
    follows container entrypoint semantics: `command` + `args`; without `command`, the `Image` registered for the
    image (`images={"ckptflow:1": Image(entrypoint=[...], cmd=[...], env={...}, working_dir=...)}`, or a bare argv
    list as the entrypoint) gives ENTRYPOINT (+ CMD when there are no `args`). No argv, or an executable that cannot
    be started: terminated reason StartError, exit code 128 (as runc reports it). An executable named without a
    path (`command: [ckptflow]`) is looked up on the container's PATH: give it with `extra_env` or the `Image`'s env
    (e.g. the venv's bin folder first). securityContext (runAsUser...) is ignored: every process runs as this user,
    so a pod can do whatever the test process can (mind the commands you give it).
  * env: a minimal base (PATH, LANG, HOME -> a per-pod folder, HOSTNAME, KUBERNETES_SERVICE_HOST/PORT), the server's
    `extra_env`, the image's env, then `envFrom` (secretRef / configMapRef, prefix, optional), then `env` (value,
    valueFrom secretKeyRef / configMapKeyRef / fieldRef: metadata.name, namespace, uid, labels['k'],
    annotations['k'], spec.nodeName, spec.serviceAccountName, status.podIP, status.hostIP). `$(VAR)` references
    are expanded in env values, command and args as Kubernetes does. A missing secret/key keeps the container
    waiting with CreateContainerConfigError (and a Failed event) until it appears. The parent process's environment
    is NOT inherited, so nothing of the test process (an HF_TOKEN, say) leaks into pods.
  * MOUNT REWRITING: the processes are not in a container, so a path like `/data/out` means nothing to them. Every
    occurrence of a container's `volumeMounts[].mountPath` (longest first, as a whole path prefix: `/data` matches
    `/data`, `/data/x`, `--out=/data/x`, `a:/data`, but not `/database` nor `gs://b/data`) in its command, args,
    env values and workingDir is replaced by the local folder of that volume (plus `subPath`). The mapping is also
    exported to the process as KUBE_STANDIN_MOUNTS (JSON {mountPath: local folder}). Paths a program builds itself
    from other strings are not rewritten; readOnly is not enforced. workingDir defaults to the image's, else to a
    per-pod folder.
  * status as a node reports it: phase Pending (scheduling, volumes, init containers) -> Running -> Succeeded/Failed
    (restartPolicy is treated as Never: containers are not restarted), containerStatuses / initContainerStatuses
    with state.waiting (ContainerCreating, PodInitializing, CreateContainerConfigError, ErrImagePull) / running
    (startedAt) / terminated (exitCode, reason Completed/Error/StartError, startedAt, finishedAt, containerID,
    message for FallbackToLogsOnError), conditions PodReadyToStartContainers/Initialized/Ready/ContainersReady/
    PodScheduled, podIP and hostIP 127.0.0.1 (the processes really listen there), startTime, qosClass,
    activeDeadlineSeconds (containers killed, phase Failed, status.reason DeadlineExceeded). Events: Scheduled,
    Pulled, Created, Started, Killing, FailedScheduling, FailedMount, Failed.
  * DELETE (grace from the body's or the query's gracePeriodSeconds, else spec.terminationGracePeriodSeconds) of a
    pod with live processes sets metadata.deletionTimestamp, emits Killing, sends SIGTERM to each container's
    process group and SIGKILL after the grace period; the object disappears once they are gone. Pods without
    processes (unscheduled, finished) and gracePeriodSeconds=0 disappear at once. When a container's main process
    exits, whatever else is left in its process group is killed, as when a container's PID 1 exits.

Test hooks: `requests` (every request: method, path, query, body text, in order; `pod_specs()`; `seen_tokens`),
`where(text)` (every request body, container log -- deleted pods' included --, event and pod where a text appears),
`set_nodes` / `add_node_labels`, `fail_next(pattern, times, exit_code)` (the next pods whose name matches the
fnmatch pattern run a process that exits with that code instead of their command), `fail_pulls(image)`,
`fail_requests(method, path_regex, status, times)` (API errors), `restart_api()` / `stop_api()` / `start_api()` (the
HTTP side goes away and comes back on the same port; pods keep running), and `pod`, `logs`, `events`, `wait_for`.
Over HTTP too (same bearer token), for a stand-in run as its own process: GET /stand-in/requests, GET
/stand-in/where?text=..., POST /stand-in/fail-next {"pattern", "times", "exit_code", "after"}, POST
/stand-in/node-labels {"labels": {...}, "node": 0}.

Run it on its own:  python -m tests.stand_ins.kube_api --port 8001 --workdir /tmp/kube [--image IMG=ARGV ...]
[--node-label k=v ...] [--env K=V ...] [--namespace NS ...] [--tls] [--token T] prints the kubeconfig path (one line)
and serves until SIGTERM/SIGINT (its pods are killed then). Point Airflow at it with the `kubernetes_default`
connection, extra `kube_config_path` (`kube_env`), not with KUBECONFIG as well.
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime
import fnmatch
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKEN = "kube-stand-in-token"
NAMESPACED = ("pods", "secrets", "configmaps", "events")
KINDS = {"pods": "Pod", "secrets": "Secret", "configmaps": "ConfigMap", "events": "Event", "namespaces": "Namespace"}
KINDS["nodes"] = "Node"
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
QUANTITY = re.compile(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?")
SUFFIX = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
SUFFIX.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60})

MSG_SUBDOMAIN = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
MSG_LABEL_VALUE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character (must be no more than 63 characters)"
)
MSG_DNS_LABEL = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'"
MSG_ENV = (
    "a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', "
    "and must not start with a digit"
)
MSG_MODIFIED = "the object has been modified; please apply your changes to the latest version and try again"
MSG_MEDIA = (
    "the body of the request was in an unknown format - accepted media types include: "
    "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json"
)
MSG_POD_UPDATE = (
    "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing "
    "tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)"
)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rfc3339nano(t_ns: int) -> str:
    s, ns = divmod(t_ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{ns:09d}Z"


def _parse_time_ns(value: str) -> int:
    dt = datetime.datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00")))
    return int(dt.timestamp() * 1e9)


def _true(q: dict, key: str) -> bool:
    return str(q.get(key, "")).lower() in ("true", "1")


def quantity(q) -> float:
    m = QUANTITY.fullmatch(str(q).strip())
    if not m:
        raise ValueError(f"quantities must match the regular expression: {q!r}")
    return float(m[1]) * SUFFIX.get(m[2] or "", 1)


def status_obj(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.status = status_obj(code, reason, message, details)


def not_found(kind: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{kind} "{name}" not found', {"name": name, "kind": kind})


def invalid(kind: str, name: str, causes: list[tuple[str, str]]) -> ApiError:
    msgs = [f"{f}: {m}" for f, m in causes]
    text = msgs[0] if len(msgs) == 1 else "[" + ", ".join(msgs) + "]"
    return ApiError(
        422,
        "Invalid",
        f'{kind} "{name}" is invalid: {text}',
        {
            "name": name,
            "kind": kind,
            "causes": [{"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes],
        },
    )


# ---------------------------------------------------------------------------------------------------- selectors


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [p.strip() for p in out if p.strip()]


def parse_label_selector(s: str):
    """-> a predicate over a labels dict; `a=b`, `a==b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`, `!a`."""
    reqs = []
    for part in _split_top(s or ""):
        if m := re.fullmatch(r"(\S+)\s+(in|notin)\s+\((.*)\)", part):
            vals = {v.strip() for v in m[3].split(",") if v.strip()}
            reqs.append((m[1], m[2], vals))
        elif m := re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(\S*)", part):
            reqs.append((m[1], {"==": "=", "=": "=", "!=": "!="}[m[2]], m[3]))
        elif m := re.fullmatch(r"!\s*(\S+)", part):
            reqs.append((m[1], "!", None))
        elif re.fullmatch(r"[^=!\s(),]+", part):
            reqs.append((part, "exists", None))
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")

    def match(labels: dict) -> bool:
        for key, op, val in reqs:
            has, v = key in labels, labels.get(key)
            ok = {
                "=": has and v == val,
                "!=": not has or v != val,
                "in": has and v in (val or ()),
                "notin": not has or v not in (val or ()),
                "exists": has,
                "!": not has,
            }[op]
            if not ok:
                return False
        return True

    return match


FIELDS = {
    "pods": (
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ),
    "events": (
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ),
    "secrets": ("type",),
}


def _field_value(obj: dict, path: str) -> str:
    if path == "source":
        return (obj.get("source") or {}).get("component", "")
    cur = obj
    for p in path.split("."):
        cur = cur.get(p) if isinstance(cur, dict) else None
    if isinstance(cur, bool):
        return str(cur).lower()
    return "" if cur is None else str(cur)


def parse_field_selector(s: str, resource: str):
    reqs = []
    for part in _split_top(s or ""):
        m = re.fullmatch(r"([^=!\s]+)\s*(==|=|!=)\s*(.*)", part)
        if not m:
            raise ApiError(400, "BadRequest", f"invalid selector: {part!r}; can't understand {part!r}")
        if m[1] not in ("metadata.name", "metadata.namespace", *FIELDS.get(resource, ())):
            raise ApiError(400, "BadRequest", f"field label not supported: {m[1]}")
        reqs.append((m[1], m[2] != "!=", m[3]))
    return lambda obj: all((_field_value(obj, f) == v) == eq for f, eq, v in reqs)


# -------------------------------------------------------------------------------------------- configuration


@dataclass
class Node:
    """A node the scheduler may use; its labels, taints ({key, value, effect}) and allocatable resources."""

    name: str = "stand-in-node"
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[dict] = field(default_factory=list)
    allocatable: dict[str, str] = field(default_factory=lambda: {"cpu": "1000", "memory": "16Ti", "pods": "1000"})

    def all_labels(self) -> dict[str, str]:
        base = {"kubernetes.io/hostname": self.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        return {**base, **self.labels}

    def to_json(self) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": self.all_labels(),
                "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.name)),
            },
            "spec": {"taints": self.taints} if self.taints else {},
            "status": {
                "allocatable": self.allocatable,
                "capacity": self.allocatable,
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": self.name},
                ],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                "nodeInfo": {
                    "machineID": "0" * 32,
                    "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_DNS, self.name)),
                    "bootID": str(uuid.uuid5(uuid.NAMESPACE_URL, self.name)),
                    "kernelVersion": os.uname().release,
                    "osImage": "kube stand-in (local processes)",
                    "containerRuntimeVersion": "local://0",
                    "kubeletVersion": "v1.31.0-stand-in",
                    "kubeProxyVersion": "v1.31.0-stand-in",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            },
        }


@dataclass
class Image:
    """What an image would bring: ENTRYPOINT, CMD, ENV, WORKDIR (paths local to this machine). `env` may set PATH
    (where `command: [name]` is looked up) and PYTHONPATH, e.g. `Image(env={"PATH": f"{venv}/bin:/usr/bin:/bin"})`."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str | None = None


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: str
    content_type: str = ""


@dataclass
class _Log:
    lines: list[tuple[int, bytes]] = field(default_factory=list)
    started: bool = False
    done: bool = False


# --------------------------------------------------------------------------------------------------- state


class KubeState:
    """Objects, their change history (for watches), the kubelet's pod runs and the test knobs. One lock."""

    def __init__(self, workdir: Path, nodes, images, extra_env, namespaces, timing):
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.workdir = workdir
        self.nodes: list[Node] = list(nodes)
        self.images: dict[str, Image] = {k: v if isinstance(v, Image) else Image(list(v)) for k, v in images.items()}
        self.extra_env = dict(extra_env)
        self.timing = {"schedule": 0.02, "pull": 0.05, "retry": 0.3, **(timing or {})}
        self.objects: dict[str, dict[tuple[str, str], dict]] = {k: {} for k in (*NAMESPACED, "namespaces")}
        self.rv = itertools.count(1000)
        self.last_rv = 1000
        self.history: list[tuple[int, str, str, dict]] = []  # (rv, resource, type, object)
        self.runs: dict[str, _PodRun] = {}  # pod uid -> run
        self.logs: dict[tuple[str, str], _Log] = {}  # (pod uid, container) -> log
        self.removed_logs: list[tuple[str, str, str, _Log]] = []  # (namespace, pod, container, log) of deleted pods
        self.requests: list[Request] = []
        self.seen_tokens: list[str] = []
        self.failures: list[list] = []  # [pattern, times left, exit code, seconds before exiting]
        self.bad_images: set[str] = set()
        self.all_pids: list[int] = []
        self.request_failures: list[list] = []  # [method, path regex, status, times left]
        self.port = 0
        self.closed = False
        for ns in namespaces:
            self.create("namespaces", "", {"metadata": {"name": ns}})

    # ---------------------------------------------------------------------------------------------- store

    def record(self, resource: str, kind: str, obj: dict) -> None:
        rv = next(self.rv)
        self.last_rv = rv
        obj["metadata"]["resourceVersion"] = str(rv)
        self.history.append((rv, resource, kind, copy.deepcopy(obj)))
        self.cond.notify_all()

    def create(self, resource: str, ns: str, obj: dict) -> dict:
        with self.lock:
            md = obj.setdefault("metadata", {})
            if resource != "namespaces":
                md["namespace"] = ns
            md.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
            md.pop("resourceVersion", None)
            obj["apiVersion"], obj["kind"] = "v1", KINDS[resource]
            if resource == "namespaces":
                obj.setdefault("spec", {"finalizers": ["kubernetes"]})
                obj["status"] = {"phase": "Active"}
                md.setdefault("labels", {})["kubernetes.io/metadata.name"] = md["name"]
            self.objects[resource][(ns, md["name"])] = obj
            self.record(resource, "ADDED", obj)
            return obj

    def remove(self, resource: str, ns: str, name: str, uid: str | None = None) -> dict | None:
        with self.lock:
            obj = self.objects[resource].get((ns, name))
            if obj is None or (uid and obj["metadata"]["uid"] != uid):
                return None
            del self.objects[resource][(ns, name)]
            self.record(resource, "DELETED", obj)
            return obj

    def event(self, pod: dict, reason: str, message: str, *, type: str = "Normal", component="kubelet", path=None):
        md = pod["metadata"]
        with self.lock:
            for ev in self.objects["events"].values():  # repeated events are counted, as the API server does
                io = ev["involvedObject"]
                if io.get("uid") == md["uid"] and ev["reason"] == reason and ev["message"] == message:
                    ev["count"] += 1
                    ev["lastTimestamp"] = _now()
                    self.record("events", "MODIFIED", ev)
                    return
            name = f"{md['name']}.{time.time_ns():x}"  # chronological, as the kubelet's event names are
            host = (pod.get("spec") or {}).get("nodeName")
            ev = {
                "metadata": {"name": name},
                "involvedObject": {
                    "kind": "Pod",
                    "namespace": md["namespace"],
                    "name": md["name"],
                    "uid": md["uid"],
                    "apiVersion": "v1",
                    "resourceVersion": md.get("resourceVersion"),
                    **({"fieldPath": path} if path else {}),
                },
                "reason": reason,
                "message": message,
                "source": {"component": component, **({"host": host} if host and component == "kubelet" else {})},
                "firstTimestamp": _now(),
                "lastTimestamp": _now(),
                "count": 1,
                "type": type,
                "eventTime": None,
                "reportingComponent": component,
                "reportingInstance": host or "",
            }
            self.create("events", md["namespace"], ev)

    def secret_or_configmap(self, resource: str, ns: str, name: str) -> dict | None:
        with self.lock:
            obj = self.objects[resource].get((ns, name))
            return copy.deepcopy(obj) if obj else None


# ------------------------------------------------------------------------------------------------- kubelet


class _Stopped(Exception):
    pass


class _PodRun:
    """The life of one pod on the stand-in's node: scheduling, volumes, containers as local processes, deletion."""

    def __init__(self, state: KubeState, pod: dict):
        self.st = state
        md = pod["metadata"]
        self.ns, self.name, self.uid = md["namespace"], md["name"], md["uid"]
        self.spec = copy.deepcopy(pod["spec"])
        self.root = state.workdir / "pods" / f"{self.ns}_{self.name}_{self.uid[:8]}"
        self.stop = threading.Event()
        self.reschedule = threading.Event()
        self.grace: float = 30.0
        self.deleting = False
        self.finished = False
        self.procs: dict[str, subprocess.Popen] = {}
        self.threads: list[threading.Thread] = []
        self.phase = "Pending"
        self.node: Node | None = None
        self.start_time: str | None = None
        self.conditions: dict[str, dict] = {}
        self.statuses: dict[str, dict] = {}  # container name -> containerStatus
        self.init_names = [c["name"] for c in self.spec.get("initContainers") or []]
        self.names = [c["name"] for c in self.spec["containers"]]
        self.volumes: dict[str, Path] = {}
        self.failure: tuple[int, float] | None = None
        self.deadline_exceeded = False
        self.pod_reason: tuple[str, str] | None = None  # status.reason / message of the pod
        self.t0 = time.time()
        for c in self.spec["containers"] + (self.spec.get("initContainers") or []):
            state.logs[(self.uid, c["name"])] = _Log()
        self.thread = threading.Thread(target=self._run, name=f"kube-stand-in-kubelet-{self.name}", daemon=True)

    # ------------------------------------------------------------------------------------------ status

    def _pod(self) -> dict | None:
        pod = self.st.objects["pods"].get((self.ns, self.name))
        return pod if pod is not None and pod["metadata"]["uid"] == self.uid else None

    def _condition(self, type_: str, status: bool, reason: str | None = None, message: str | None = None):
        c = self.conditions.get(type_)
        s = "True" if status else "False"
        if c is None or c["status"] != s or c.get("reason") != reason:
            self.conditions[type_] = {
                "type": type_,
                "status": s,
                "lastProbeTime": None,
                "lastTransitionTime": _now(),
                **({"reason": reason} if reason else {}),
                **({"message": message} if message else {}),
            }

    def _publish(self) -> None:
        """Write the run's view into the stored pod's status (and spec.nodeName) as one MODIFIED change."""
        with self.st.lock:
            pod = self._pod()
            if pod is None:
                return
            running = [n for n in self.names if "running" in self.statuses.get(n, {}).get("state", {})]
            if self.node is not None:
                unready = [n for n in self.names if n not in running]
                if self.phase in ("Succeeded", "Failed"):
                    self._condition("Ready", False, "PodCompleted")
                    self._condition("ContainersReady", False, "PodCompleted")
                elif unready:
                    msg = f"containers with unready status: [{' '.join(unready)}]"
                    self._condition("Ready", False, "ContainersNotReady", msg)
                    self._condition("ContainersReady", False, "ContainersNotReady", msg)
                else:
                    self._condition("Ready", True)
                    self._condition("ContainersReady", True)
            order = ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]
            status = pod["status"]
            status["phase"] = self.phase
            if self.pod_reason:
                status["reason"], status["message"] = self.pod_reason
            status["conditions"] = [copy.deepcopy(self.conditions[t]) for t in order if t in self.conditions]
            if self.node is not None:
                pod["spec"]["nodeName"] = self.node.name
                status.update(hostIP="127.0.0.1", hostIPs=[{"ip": "127.0.0.1"}])
                status.update(podIP="127.0.0.1", podIPs=[{"ip": "127.0.0.1"}], startTime=self.start_time)
            if self.statuses:
                status["containerStatuses"] = [
                    copy.deepcopy(self.statuses[n]) for n in self.names if n in self.statuses
                ]
                inits = [copy.deepcopy(self.statuses[n]) for n in self.init_names if n in self.statuses]
                if inits:
                    status["initContainerStatuses"] = inits
            self.st.record("pods", "MODIFIED", pod)

    def _cstatus(self, c: dict, state: dict, **kw) -> None:
        old = self.statuses.get(c["name"], {})
        cid = old.get("containerID")
        self.statuses[c["name"]] = {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": "",
            **({"containerID": cid} if cid else {}),
            "ready": False,
            "started": False,
            "restartCount": 0,
            "state": state,
            "lastState": {},
            **kw,
        }

    def _event(self, reason: str, message: str, **kw) -> None:
        with self.st.lock:  # a pod already removed (force delete) still gets its events, as on a node
            pod = self._pod() or {
                "metadata": {"name": self.name, "namespace": self.ns, "uid": self.uid},
                "spec": {"nodeName": self.node.name if self.node else None},
            }
            self.st.event(pod, reason, message, **kw)

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise _Stopped

    # ---------------------------------------------------------------------------------------- lifecycle

    def _run(self) -> None:
        try:
            self._schedule()
            self._prepare_volumes()
            if self._run_init_containers():
                self._run_containers()
        except _Stopped:
            pass
        except Exception as e:  # a stand-in bug: make it visible in the pod rather than hang
            self.phase = "Failed"
            self._event("StandInError", f"{type(e).__name__}: {e}", type="Warning")
            self._publish()
        finally:
            self._kill_all(0.0 if self.st.closed else self.grace)
            with self.st.lock:
                self.finished = True
                if self.deleting:
                    self.st.remove("pods", self.ns, self.name, self.uid)
                    self._cleanup()

    def _cleanup(self) -> None:
        for uid, c in [k for k in self.st.logs if k[0] == self.uid]:
            self.st.removed_logs.append((self.ns, self.name, c, self.st.logs.pop((uid, c))))
        self.st.runs.pop(self.uid, None)
        shutil.rmtree(self.root, ignore_errors=True)

    def _schedule(self) -> None:
        self._sleep(self.st.timing["schedule"])
        while True:
            with self.st.lock:
                nodes = list(self.st.nodes)
            node, why = _pick_node(self.spec, nodes)
            if node is not None:
                break
            msg = f"0/{len(nodes)} nodes are available: {why}. preemption: 0/{len(nodes)} nodes are available: "
            msg += f"{len(nodes)} Preemption is not helpful for scheduling."
            self._condition("PodScheduled", False, "Unschedulable", msg)
            self._event("FailedScheduling", msg, type="Warning", component="default-scheduler")
            self._publish()
            self.reschedule.clear()
            while not self.reschedule.wait(0.2):
                if self.stop.is_set():
                    raise _Stopped
        self.node, self.start_time = node, _now()
        self._condition("PodScheduled", True)
        self._condition("PodReadyToStartContainers", False)
        self._condition("Initialized", not self.init_names, None if not self.init_names else "ContainersNotInitialized")
        for c in self.spec.get("initContainers") or []:
            self._cstatus(c, {"waiting": {"reason": "PodInitializing"}})
        for c in self.spec["containers"]:
            self._cstatus(c, {"waiting": {"reason": "PodInitializing" if self.init_names else "ContainerCreating"}})
        self._event(
            "Scheduled", f"Successfully assigned {self.ns}/{self.name} to {node.name}", component="default-scheduler"
        )
        self._publish()

    def _prepare_volumes(self) -> None:
        while True:
            missing = None
            for v in self.spec.get("volumes") or []:
                try:
                    self.volumes[v["name"]] = self._volume(v)
                except LookupError as e:
                    missing = f'MountVolume.SetUp failed for volume "{v["name"]}" : {e.args[0]}'
                    break
            if missing is None:
                break
            self._event("FailedMount", missing, type="Warning")
            self._sleep(self.st.timing["retry"])
        self._condition("PodReadyToStartContainers", True)
        self._publish()

    def _volume(self, v: dict) -> Path:
        name = v["name"]
        if "hostPath" in v:
            p = Path(v["hostPath"]["path"])
            if v["hostPath"].get("type") in ("DirectoryOrCreate", None, ""):
                p.mkdir(parents=True, exist_ok=True)
            return p
        if "persistentVolumeClaim" in v:
            p = self.st.workdir / "pvc" / self.ns / v["persistentVolumeClaim"]["claimName"]
            p.mkdir(parents=True, exist_ok=True)
            return p
        if "csi" in v:  # e.g. GCS FUSE: one folder per driver and bucket, shared by every pod that mounts it
            p = csi_folder(self.st.workdir, v["csi"], name)
            p.mkdir(parents=True, exist_ok=True)
            return p
        p = self.root / "volumes" / name
        if p.exists():
            shutil.rmtree(p)
        p.mkdir(parents=True)
        for kind, resource, ref_key in (("secret", "secrets", "secretName"), ("configMap", "configmaps", "name")):
            if kind in v:
                src = v[kind]
                obj = self.st.secret_or_configmap(resource, self.ns, src.get(ref_key, ""))
                if obj is None:
                    if src.get("optional"):
                        return p
                    raise LookupError(
                        f'{resource[:-1] if kind == "secret" else "configmap"} "{src.get(ref_key)}" not found'
                    )
                data = (
                    {k: base64.b64decode(x) for k, x in (obj.get("data") or {}).items()}
                    if kind == "secret"
                    else {
                        **{k: x.encode() for k, x in (obj.get("data") or {}).items()},
                        **{k: base64.b64decode(x) for k, x in (obj.get("binaryData") or {}).items()},
                    }
                )
                items = src.get("items") or [{"key": k, "path": k} for k in data]
                for it in items:
                    if it["key"] not in data:
                        if src.get("optional"):
                            continue
                        raise LookupError(f"configmap references non-existent config key: {it['key']}")
                    f = p / it["path"]
                    f.parent.mkdir(parents=True, exist_ok=True)
                    f.write_bytes(data[it["key"]])
                    f.chmod(it.get("mode", src.get("defaultMode", 0o644)))
                return p
        if "emptyDir" not in v:
            kinds = [k for k in v if k != "name"]
            self._event(
                "StandInVolume", f"volume {name!r} ({', '.join(kinds)}) served as an empty folder", type="Warning"
            )
        return p

    # ---------------------------------------------------------------------------------------- containers

    def _mounts(self, c: dict) -> dict[str, str]:
        out = {}
        for m in c.get("volumeMounts") or []:
            local = self.volumes.get(m["name"])
            if local is None:
                continue
            if m.get("subPath"):
                local = local / m["subPath"]
                local.mkdir(parents=True, exist_ok=True)
            out[m["mountPath"].rstrip("/") or "/"] = str(local)
        return out

    def _field_ref(self, path: str) -> str:
        with self.st.lock:
            pod = copy.deepcopy(self._pod() or {})
        md = pod.get("metadata", {})
        if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
            return (md.get(m[1]) or {}).get(m[2], "")
        simple = {
            "metadata.name": md.get("name"),
            "metadata.namespace": md.get("namespace"),
            "metadata.uid": md.get("uid"),
            "spec.nodeName": self.node.name if self.node else "",
            "spec.serviceAccountName": self.spec.get("serviceAccountName", "default"),
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        if path not in simple:
            raise LookupError(f"unsupported fieldRef {path!r} in the stand-in")
        return simple[path] or ""

    def _ref(self, resource: str, name: str, key: str | None, optional: bool) -> dict | str | None:
        obj = self.st.secret_or_configmap(resource, self.ns, name)
        label = "secret" if resource == "secrets" else "configmap"
        if obj is None:
            if optional:
                return None
            raise LookupError(f'{label} "{name}" not found')
        if key is None:
            if resource == "secrets":
                return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
            return dict(obj.get("data") or {})
        data = obj.get("data") or {}
        if key not in data:
            if optional:
                return None
            raise LookupError(f"couldn't find key {key} in {label.capitalize()} {self.ns}/{name}")
        return base64.b64decode(data[key]).decode() if resource == "secrets" else data[key]

    def _container_env(self, c: dict, image: Image | None, mounts: dict[str, str]) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(self.root / "home"),
            "HOSTNAME": self.name,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.st.port),
            **self.st.extra_env,
            **(image.env if image else {}),
        }
        for src in c.get("envFrom") or []:
            for kind, resource in (("secretRef", "secrets"), ("configMapRef", "configmaps")):
                if kind in src:
                    vals = self._ref(resource, src[kind]["name"], None, bool(src[kind].get("optional"))) or {}
                    env.update({src.get("prefix", "") + k: v for k, v in vals.items()})
        for e in c.get("env") or []:
            if "valueFrom" not in e:
                env[e["name"]] = _expand(rewrite_paths(e.get("value", ""), mounts), env)
                continue
            vf = e["valueFrom"]
            if "secretKeyRef" in vf or "configMapKeyRef" in vf:
                kind, resource = (
                    ("secretKeyRef", "secrets") if "secretKeyRef" in vf else ("configMapKeyRef", "configmaps")
                )
                r = vf[kind]
                val = self._ref(resource, r["name"], r["key"], bool(r.get("optional")))
                if val is not None:
                    env[e["name"]] = val
            elif "fieldRef" in vf:
                env[e["name"]] = self._field_ref(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                res = vf["resourceFieldRef"]["resource"]
                kind, _, what = res.partition(".")
                q = ((c.get("resources") or {}).get(kind) or {}).get(what)
                env[e["name"]] = (
                    str(int(quantity(q) / quantity(vf["resourceFieldRef"].get("divisor", "1")))) if q else "0"
                )
        env["KUBE_STANDIN_MOUNTS"] = json.dumps(mounts)
        return env

    def _argv(self, c: dict, image: Image | None, env: dict, mounts: dict[str, str]) -> list[str]:
        command, args = c.get("command"), c.get("args")
        if command:
            argv = list(command) + list(args or [])
        else:
            entry = list(image.entrypoint) if image else []
            argv = entry + (list(args) if args is not None else list(image.cmd if image else []))
        return [_expand(rewrite_paths(a, mounts), env) for a in argv]

    def _launch(self, c: dict, path: str) -> tuple[subprocess.Popen | None, str | None]:
        """Start one container's process (or say why it cannot start). Retries config errors until deletion."""
        if c.get("image", "") in self.st.bad_images:
            msg = f'failed to pull and unpack image "{c["image"]}": not found'
            self._cstatus(c, {"waiting": {"reason": "ErrImagePull", "message": msg}})
            self._event("Failed", f'Failed to pull image "{c["image"]}": {msg}', type="Warning", path=path)
            self._publish()
            while c.get("image", "") in self.st.bad_images:
                self._sleep(self.st.timing["retry"])
        self._sleep(self.st.timing["pull"])
        with self.st.lock:
            image = _lookup_image(self.st.images, c.get("image", ""))
        self._event("Pulled", f'Container image "{c.get("image")}" already present on machine', path=path)
        mounts = self._mounts(c)
        while True:
            try:
                env = self._container_env(c, image, mounts)
                break
            except LookupError as e:
                self._cstatus(c, {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}})
                self._event("Failed", f"Error: {e}", type="Warning", path=path)
                self._publish()
                self._sleep(self.st.timing["retry"])
        argv = self._argv(c, image, env, mounts)
        wd = c.get("workingDir") or (image.working_dir if image else None)
        cwd = Path(rewrite_paths(wd, mounts)) if wd else self.root / "cwd"
        (self.root / "home").mkdir(parents=True, exist_ok=True)
        with self.st.lock:
            if self.failure is None and c["name"] == self.names[0] and path.startswith("spec.containers"):
                self.failure = _take_failure(self.st.failures, self.name)
        if self.failure is not None and path.startswith("spec.containers") and c["name"] == self.names[0]:
            code, after = self.failure
            argv = [
                sys.executable,
                "-c",
                f"import sys, time; print('kube stand-in: injected failure, exit code {code}', flush=True); "
                f"time.sleep({after}); sys.exit({code})",
            ]
        cid = "containerd://" + hashlib.sha256(f"{self.uid}/{c['name']}".encode()).hexdigest()
        self.statuses.setdefault(c["name"], {})["containerID"] = cid
        self._event("Created", f"Created container {c['name']}", path=path)
        if not argv:
            return (
                None,
                "no command specified: the pod has no command and the stand-in knows no entrypoint for its image",
            )
        try:
            cwd.mkdir(parents=True, exist_ok=True)
            with self.st.lock:
                if self.stop.is_set():
                    raise _Stopped
                if path.startswith("spec.containers"):
                    self.phase = "Running"  # as a node reports it once a container has started
                proc = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                self.procs[c["name"]] = proc
                self.st.all_pids.append(proc.pid)
        except OSError as e:
            return None, f'failed to create containerd task: exec: "{argv[0]}": {e.strerror}'
        self._event("Started", f"Started container {c['name']}", path=path)
        return proc, None

    def _supervise(self, c: dict, proc: subprocess.Popen, started: str, done: threading.Event) -> None:
        log = self.st.logs[(self.uid, c["name"])]
        reader = threading.Thread(
            target=self._read, args=(proc, log), name=f"kube-stand-in-log-{self.name}", daemon=True
        )
        reader.start()
        deadline = self.spec.get("activeDeadlineSeconds")
        rc = None
        while rc is None:
            try:
                rc = proc.wait(0.2)
            except subprocess.TimeoutExpired:
                if deadline and time.time() - self.t0 > deadline and not self.stop.is_set():
                    with self.st.lock:
                        self.deadline_exceeded = True
                        msg = "Pod was active on the node longer than the specified deadline"
                        self.pod_reason = ("DeadlineExceeded", msg)
                        self._event("DeadlineExceeded", msg, type="Warning")
                        self.grace = 0
                        self.stop.set()
        try:  # whatever is left in the "container" dies with its main process
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        reader.join(5)
        with self.st.lock:
            log.done = True
            self.st.cond.notify_all()
        code = rc if rc >= 0 else 128 - rc
        term = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started,
            "finishedAt": _now(),
            "containerID": self.statuses[c["name"]].get("containerID"),
        }
        if code and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            tail = b"".join(line for _, line in log.lines[-80:])[-2048:]
            term["message"] = tail.decode("utf-8", "replace")
        with self.st.lock:
            self._cstatus(c, {"terminated": term})
            states = [self.statuses.get(n, {}).get("state", {}) for n in self.names]
            if c["name"] in self.names and all("terminated" in x for x in states):  # the phase moves with the last one
                ok = all(x["terminated"]["exitCode"] == 0 for x in states) and not self.stop.is_set()
                self.phase = "Succeeded" if ok else "Failed"
            done.set()
            self._publish()

    def _read(self, proc: subprocess.Popen, log: _Log) -> None:
        for line in iter(proc.stdout.readline, b""):
            with self.st.lock:
                log.lines.append((time.time_ns(), line))
                self.st.cond.notify_all()
        proc.stdout.close()

    def _start(self, c: dict, path: str) -> threading.Event:
        done = threading.Event()
        proc, why = self._launch(c, path)
        with self.st.lock:
            self.st.logs[(self.uid, c["name"])].started = True
        if proc is None:
            self._cstatus(
                c,
                {
                    "terminated": {
                        "exitCode": 128,
                        "reason": "StartError",
                        "message": why,
                        "startedAt": _now(),
                        "finishedAt": _now(),
                    }
                },
            )
            self._event("Failed", f"Error: {why}", type="Warning", path=path)
            with self.st.lock:
                self.st.logs[(self.uid, c["name"])].done = True
            done.set()
            self._publish()
            return done
        started = _now()
        with self.st.lock:
            self._cstatus(c, {"running": {"startedAt": started}}, ready=True, started=True)
            t = threading.Thread(
                target=self._supervise,
                args=(c, proc, started, done),
                name=f"kube-stand-in-ctr-{self.name}",
                daemon=True,
            )
            self.threads.append(t)
            t.start()
        return done

    def _exit_code(self, name: str) -> int:
        return self.statuses[name]["state"].get("terminated", {}).get("exitCode", 1)

    def _run_init_containers(self) -> bool:
        self.t0 = time.time()
        for i, c in enumerate(self.spec.get("initContainers") or []):
            done = self._start(c, f"spec.initContainers{{{c['name']}}}")
            self._publish()
            while not done.wait(0.1):
                if self.stop.is_set():
                    self._kill_all(self.grace)
                    done.wait(5)
                    raise _Stopped
            if self._exit_code(c["name"]) != 0:
                self.phase = "Failed"
                self._condition(
                    "Initialized",
                    False,
                    "ContainersNotInitialized",
                    f"containers with incomplete status: [{c['name']}]",
                )
                self._publish()
                return False
        self._condition("Initialized", True)
        for c in self.spec["containers"]:
            self._cstatus(c, {"waiting": {"reason": "ContainerCreating"}})
        self._publish()
        return True

    def _run_containers(self) -> None:
        dones = [self._start(c, f"spec.containers{{{c['name']}}}") for c in self.spec["containers"]]
        self._publish()
        while not all(d.wait(0.1) for d in dones):
            if self.stop.is_set():
                break
        if self.stop.is_set():
            self._kill_all(self.grace)
            for d in dones:
                d.wait(5)
        with self.st.lock:
            codes = [self._exit_code(n) for n in self.names]
            self.phase = "Succeeded" if all(x == 0 for x in codes) and not self.stop.is_set() else "Failed"
            self._publish()

    def _kill_all(self, grace: float) -> None:
        """SIGTERM every live process group, SIGKILL after `grace` seconds (or at once if the run is closed)."""
        with self.st.lock:
            live = {n: p for n, p in self.procs.items() if p.poll() is None}
        if not live:
            return
        for n in live:
            path = f"spec.initContainers{{{n}}}" if n in self.init_names else f"spec.containers{{{n}}}"
            self._event("Killing", f"Stopping container {n}", path=path)
        for p in live.values():
            _signal_group(p, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        t0 = time.time()  # a second delete with a shorter grace period (self.grace) cuts the wait short
        while any(p.poll() is None for p in live.values()) and time.time() - t0 < min(grace, self.grace):
            time.sleep(0.05)
        for p in live.values():
            if p.poll() is None:
                _signal_group(p, signal.SIGKILL)
        for p in live.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def terminate(self, grace: float) -> None:
        self.grace = min(self.grace, grace) if self.deleting else grace
        self.deleting = True
        self.stop.set()


def csi_folder(workdir: Path, csi: dict, volume_name: str = "volume") -> Path:
    """The local folder of a CSI volume: `csi/{driver}/{bucketName or volumeHandle}[/{only-dir}]` (GCS FUSE's
    `only-dir` mount option mounts a folder of the bucket)."""
    attrs = csi.get("volumeAttributes") or {}
    p = (
        workdir
        / "csi"
        / csi.get("driver", "unknown")
        / (attrs.get("bucketName") or attrs.get("volumeHandle") or volume_name)
    )
    opts = dict(o.split("=", 1) for o in (attrs.get("mountOptions") or "").split(",") if "=" in o)
    return p / opts["only-dir"] if opts.get("only-dir") else p


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _take_failure(failures: list[list], name: str) -> tuple[int, float] | None:
    for f in failures:
        if f[1] > 0 and fnmatch.fnmatchcase(name, f[0]):
            f[1] -= 1
            return f[2], f[3]
    return None


def _lookup_image(images: dict[str, Image], image: str) -> Image | None:
    if image in images:
        return images[image]
    bare = re.sub(r"(@sha256:[0-9a-f]+|:[^/:]+)$", "", image)
    if bare in images:
        return images[bare]
    return next((v for k, v in images.items() if fnmatch.fnmatchcase(image, k)), None)


def rewrite_paths(s: str, mounts: dict[str, str]) -> str:
    """Replace each mountPath (a whole path prefix, longest first) occurring in `s` by its local folder."""
    paths = sorted((m for m in mounts if m != "/"), key=len, reverse=True)
    if not paths or not s:
        return s
    pattern = r"(?<![\w.~/-])(" + "|".join(re.escape(p) for p in paths) + r")(?=/|$|[^\w.-])"
    return re.sub(pattern, lambda m: mounts[m[1]], s)


def _expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are substituted, `$$(` escapes, others stay as written."""

    def sub(m):
        if m[1] is not None:
            return f"$({m[1]})"
        return env.get(m[2], m[0])

    return re.sub(r"\$\$\(([A-Za-z_][\w.-]*)\)|\$\(([A-Za-z_][\w.-]*)\)", sub, s)


def _tolerates(tolerations: list[dict], taint: dict) -> bool:
    for t in tolerations or []:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator") == "Exists":
            if not t.get("key") or t["key"] == taint["key"]:
                return True
        elif t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", ""):
            return True
    return False


def _match_expr(labels: dict, e: dict) -> bool:
    k, op, vals = e["key"], e["operator"], e.get("values") or []
    if op == "In":
        return labels.get(k) in vals
    if op == "NotIn":
        return labels.get(k) not in vals
    if op == "Exists":
        return k in labels
    if op == "DoesNotExist":
        return k not in labels
    if op in ("Gt", "Lt"):
        try:
            v, ref = int(labels[k]), int(vals[0])
        except (KeyError, ValueError, IndexError):
            return False
        return v > ref if op == "Gt" else v < ref
    return False


def _pick_node(spec: dict, nodes: list[Node]) -> tuple[Node | None, str]:
    reasons: dict[str, int] = {}
    requests: dict[str, float] = {}
    for c in spec["containers"] + (spec.get("initContainers") or []):
        res = c.get("resources") or {}
        for k, v in {**(res.get("limits") or {}), **(res.get("requests") or {})}.items():
            requests[k] = max(requests.get(k, 0.0), quantity(v))
    for node in nodes:
        labels = node.all_labels()
        why = None
        if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
            why = "node(s) didn't match Pod's node affinity/selector"
        req = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution"
        )
        if why is None and req:
            terms = req.get("nodeSelectorTerms") or []
            ok = any(
                all(_match_expr(labels, e) for e in t.get("matchExpressions") or [])
                and all(_match_expr({"metadata.name": node.name}, e) for e in t.get("matchFields") or [])
                for t in terms
            )
            if not ok:
                why = "node(s) didn't match Pod's node affinity/selector"
        if why is None:
            for taint in node.taints:
                if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(
                    spec.get("tolerations"), taint
                ):
                    why = f"node(s) had untolerated taint {{{taint['key']}: {taint.get('value', '')}}}"
                    break
        if why is None:
            for k, q in requests.items():
                if k in ("ephemeral-storage",) or k.startswith("hugepages-"):
                    continue
                if k not in node.allocatable or quantity(node.allocatable[k]) < q:
                    why = f"Insufficient {k}"
                    break
        if why is None:
            return node, ""
        reasons[why] = reasons.get(why, 0) + 1
    return None, ", ".join(f"{n} {w}" for w, n in sorted(reasons.items())) or "no nodes available to schedule pods"


# ------------------------------------------------------------------------------------------ pod defaults


def _validate_pod(pod: dict) -> list[tuple[str, str]]:
    causes = []
    md, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    name = md.get("name", "")
    if not name:
        causes.append(("metadata.name", "Required value: name or generateName is required"))
    elif len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        causes.append(
            (
                "metadata.name",
                f'Invalid value: "{name}": {MSG_SUBDOMAIN}',
            )
        )
    for k, v in (md.get("labels") or {}).items():
        key = k.rsplit("/", 1)[-1]
        if not key or len(key) > 63 or not LABEL_VALUE.fullmatch(key):
            causes.append(
                ("metadata.labels", f'Invalid value: "{k}": name part must consist of alphanumeric characters')
            )
        if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.fullmatch(v):
            causes.append(
                (
                    "metadata.labels",
                    f'Invalid value: "{v}": {MSG_LABEL_VALUE}',
                )
            )
    containers = spec.get("containers") or []
    if not containers:
        causes.append(("spec.containers", "Required value"))
    volumes = {v.get("name") for v in spec.get("volumes") or []}
    seen = set()
    for kind, lst in (("initContainers", spec.get("initContainers") or []), ("containers", containers)):
        for i, c in enumerate(lst):
            p = f"spec.{kind}[{i}]"
            if not c.get("name"):
                causes.append((f"{p}.name", "Required value"))
            elif not DNS_LABEL.fullmatch(c["name"]) or len(c["name"]) > 63:
                causes.append(
                    (
                        f"{p}.name",
                        f'Invalid value: "{c["name"]}": {MSG_DNS_LABEL}',
                    )
                )
            elif c["name"] in seen:
                causes.append((f"{p}.name", f'Duplicate value: "{c["name"]}"'))
            seen.add(c.get("name"))
            if not c.get("image"):
                causes.append((f"{p}.image", "Required value"))
            for j, e in enumerate(c.get("env") or []):
                if not ENV_NAME.fullmatch(e.get("name", "")):
                    causes.append(
                        (
                            f"{p}.env[{j}].name",
                            f'Invalid value: "{e.get("name", "")}": {MSG_ENV}',
                        )
                    )
            for j, m in enumerate(c.get("volumeMounts") or []):
                if m.get("name") not in volumes:
                    causes.append((f"{p}.volumeMounts[{j}].name", f'Not found: "{m.get("name")}"'))
                if not str(m.get("mountPath", "")).startswith("/"):
                    causes.append((f"{p}.volumeMounts[{j}].mountPath", "Required value"))
    return causes


def _default_pod(pod: dict) -> None:
    spec = pod.setdefault("spec", {})
    for k, v in (
        ("restartPolicy", "Always"),
        ("terminationGracePeriodSeconds", 30),
        ("dnsPolicy", "ClusterFirst"),
        ("serviceAccountName", "default"),
        ("serviceAccount", "default"),
        ("securityContext", {}),
        ("schedulerName", "default-scheduler"),
        ("enableServiceLinks", True),
        ("priority", 0),
        ("preemptionPolicy", "PreemptLowerPriority"),
    ):
        spec.setdefault(k, v)
    tol = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key for t in tol):
            tol.append({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300})
    qos = set()
    for c in spec.get("containers", []) + (spec.get("initContainers") or []):
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        image = c.get("image", "")
        latest = image.endswith(":latest") or not re.search(r":[^/]+$|@", image)
        c.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        res = c.setdefault("resources", {})
        lim, req = res.get("limits") or {}, res.get("requests") or {}
        if lim and not req:
            res["requests"] = dict(lim)
            req = res["requests"]
        if not lim and not req:
            qos.add("BestEffort")
        elif all(k in lim and k in req and quantity(lim[k]) == quantity(req[k]) for k in ("cpu", "memory")):
            qos.add("Guaranteed")
        else:
            qos.add("Burstable")
    pod["status"] = {
        "phase": "Pending",
        "qosClass": "BestEffort" if qos == {"BestEffort"} else "Guaranteed" if qos == {"Guaranteed"} else "Burstable",
    }


# ------------------------------------------------------------------------------------------------ patching


def merge_patch(target, patch):
    """RFC 7386 (keys starting with `$`, strategic-merge directives, are dropped)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if k.startswith("$"):
            continue
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(doc, ops: list[dict]):
    doc = copy.deepcopy(doc)

    def walk(path):
        parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
        cur = doc
        for p in parts[:-1]:
            cur = cur[int(p)] if isinstance(cur, list) else cur[p]
        return cur, parts[-1]

    for op in ops:
        try:
            parent, key = walk(op["path"])
            if isinstance(parent, list):
                idx = len(parent) if key == "-" else int(key)
            if op["op"] in ("add", "replace"):
                if isinstance(parent, list):
                    parent.insert(idx, op["value"]) if op["op"] == "add" else parent.__setitem__(idx, op["value"])
                else:
                    if op["op"] == "replace" and key not in parent:
                        raise KeyError(key)
                    parent[key] = op["value"]
            elif op["op"] == "remove":
                del parent[idx if isinstance(parent, list) else key]
            elif op["op"] == "test":
                if (parent[idx] if isinstance(parent, list) else parent[key]) != op["value"]:
                    raise ApiError(
                        422,
                        "Invalid",
                        f"the server rejected our request due to an error in our request: test failed at {op['path']}",
                    )
            else:
                raise ApiError(400, "BadRequest", f"Unknown json patch operation {op['op']!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise ApiError(
                422, "Invalid", f"the server rejected our request due to an error in our request: {op.get('path')}: {e}"
            )
    return doc


# ------------------------------------------------------------------------------------------------- handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-stand-in"
    timeout = 120
    state: KubeState
    token: str | None

    def log_message(self, *args):
        pass

    def setup(self):
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(self.timeout)
            self.request.do_handshake()
        super().setup()
        with self.server.conn_lock:
            self.server.conns.add(self.request)
            if self.server.stopping.is_set():
                self.request.shutdown(socket.SHUT_RDWR)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.conn_lock:
                self.server.conns.discard(self.request)

    # ------------------------------------------------------------------------------------------ helpers

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, data) -> None:
        self._send(code, json.dumps(data).encode())

    def _start_chunked(self, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _stopping(self) -> bool:
        return self.server.stopping.is_set()

    # ------------------------------------------------------------------------------------------ routing

    def do_GET(self):
        self._route("GET")

    def do_HEAD(self):
        self._route("HEAD")

    def do_POST(self):
        self._route("POST")

    def do_PUT(self):
        self._route("PUT")

    def do_PATCH(self):
        self._route("PATCH")

    def do_DELETE(self):
        self._route("DELETE")

    def _route(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        st = self.state
        with st.lock:
            st.requests.append(
                Request(
                    method,
                    path,
                    urllib.parse.parse_qs(url.query),
                    raw.decode("utf-8", "replace"),
                    self.headers.get("Content-Type", ""),
                )
            )
        try:
            auth = self.headers.get("Authorization", "")
            if auth:
                st.seen_tokens.append(auth)
            if self.token and auth != f"Bearer {self.token}" and path not in ("/healthz", "/livez", "/readyz"):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            with st.lock:
                for f in st.request_failures:
                    if f[3] > 0 and f[0] in (method, "*") and re.search(f[1], path):
                        f[3] -= 1
                        raise ApiError(
                            f[2],
                            {429: "TooManyRequests", 503: "ServiceUnavailable"}.get(f[2], "InternalError"),
                            "injected failure",
                        )
            body = None
            if raw and method in ("POST", "PUT", "PATCH", "DELETE"):
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
            self._dispatch(method, path, q, body)
        except ApiError as e:
            self._json(e.status["code"], e.status)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # a stand-in bug: answer it as the API server's InternalError
            self.close_connection = True
            try:
                self._json(500, status_obj(500, "InternalError", f"stand-in error: {type(e).__name__}: {e}"))
            except OSError:
                pass

    def _dispatch(self, method: str, path: str, q: dict, body) -> None:
        st = self.state
        if path.startswith("/stand-in/"):
            return self._control(method, path, q, body)
        if path in ("/healthz", "/livez", "/readyz"):
            return self._send(200, b"ok", "text/plain")
        if path == "/version":
            return self._json(
                200,
                {
                    "major": "1",
                    "minor": "31",
                    "gitVersion": "v1.31.0-stand-in",
                    "gitCommit": "0" * 40,
                    "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z",
                    "goVersion": "go1.22",
                    "compiler": "gc",
                    "platform": "linux/amd64",
                },
            )
        if path == "/api":
            return self._json(
                200,
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{st.port}"}
                    ],
                },
            )
        if path == "/apis":
            return self._json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        if path == "/api/v1":
            res = [
                ("namespaces", False, ["create", "delete", "get", "list", "watch"]),
                ("nodes", False, ["get", "list"]),
                ("pods", True, ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]),
                ("pods/log", True, ["get"]),
                ("pods/status", True, ["get"]),
                ("secrets", True, ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]),
                ("configmaps", True, ["create", "delete", "get", "list", "patch", "update", "watch"]),
                ("events", True, ["create", "delete", "get", "list", "patch", "update", "watch"]),
            ]
            return self._json(
                200,
                {
                    "kind": "APIResourceList",
                    "groupVersion": "v1",
                    "resources": [
                        {"name": n, "singularName": "", "namespaced": ns, "kind": KINDS[n.split("/")[0]], "verbs": v}
                        for n, ns, v in res
                    ],
                },
            )
        parts = path.split("/")[1:]
        if parts[:2] != ["api", "v1"]:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        parts = parts[2:]
        if parts == ["namespaces"] and method == "POST":
            return self._create("namespaces", "", body, q)
        if parts and parts[0] == "nodes":
            if len(parts) == 1:
                with st.lock:
                    items = [n.to_json() for n in st.nodes]
                return self._json(
                    200,
                    {
                        "kind": "NodeList",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(st.last_rv)},
                        "items": items,
                    },
                )
            with st.lock:
                node = next((n for n in st.nodes if n.name == parts[1]), None)
            if node is None:
                raise not_found("nodes", parts[1])
            return self._json(200, node.to_json())
        if len(parts) == 1 and parts[0] in (*NAMESPACED, "namespaces") and method == "GET":
            return self._list(parts[0], None, q)
        if parts[:1] == ["namespaces"] and len(parts) == 2:
            if method == "GET":
                with st.lock:
                    obj = st.objects["namespaces"].get(("", parts[1]))
                    if obj is None:
                        raise not_found("namespaces", parts[1])
                    return self._json(200, copy.deepcopy(obj))
            raise ApiError(
                405, "MethodNotAllowed", f"the server does not allow this method on the requested resource ({method})"
            )
        if parts[:1] == ["namespaces"] and len(parts) >= 3:
            ns, resource, rest = parts[1], parts[2], parts[3:]
            if resource not in NAMESPACED:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if not rest:
                if method == "GET":
                    return self._list(resource, ns, q)
                if method == "POST":
                    return self._create(resource, ns, body, q)
                if method == "DELETE":
                    return self._delete_collection(resource, ns, body, q)
            elif len(rest) == 1:
                if method == "GET":
                    return self._json(200, self._get(resource, ns, rest[0]))
                if method == "DELETE":
                    return self._delete(resource, ns, rest[0], body, q)
                if method in ("PATCH", "PUT"):
                    return self._update(resource, ns, rest[0], body, q, method)
            elif resource == "pods" and len(rest) == 2:
                if rest[1] == "status" and method == "GET":
                    return self._json(200, self._get(resource, ns, rest[0]))
                if rest[1] == "log" and method == "GET":
                    return self._log(ns, rest[0], q)
                if rest[1] in ("exec", "attach", "portforward"):
                    raise ApiError(400, "BadRequest", "Upgrade request required")
            raise ApiError(
                405, "MethodNotAllowed", f"the server does not allow this method on the requested resource ({method})"
            )
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _control(self, method: str, path: str, q: dict, body) -> None:
        """Test hooks over HTTP, for a stand-in run as its own process (not a Kubernetes API; same token)."""
        st, body = self.state, body if isinstance(body, dict) else {}
        with st.lock:
            if (method, path) == ("GET", "/stand-in/requests"):
                return self._json(200, [r.__dict__ for r in st.requests])
            if (method, path) == ("GET", "/stand-in/where"):
                return self._json(200, self.server.owner.where(q.get("text", "")))
            if (method, path) == ("POST", "/stand-in/fail-next"):
                self.server.owner.fail_next(
                    body["pattern"],
                    int(body.get("times", 1)),
                    int(body.get("exit_code", 1)),
                    float(body.get("after", 0)),
                )
                return self._json(200, {"failures": st.failures})
            if (method, path) == ("POST", "/stand-in/node-labels"):
                self.server.owner.add_node_labels(body.get("labels") or {}, int(body.get("node", 0)))
                return self._json(200, {"nodes": [n.to_json() for n in st.nodes]})
        raise ApiError(404, "NotFound", f"no stand-in control {method} {path}")

    # ---------------------------------------------------------------------------------------- resources

    def _get(self, resource: str, ns: str, name: str) -> dict:
        with self.state.lock:
            obj = self.state.objects[resource].get((ns, name))
            if obj is None:
                raise not_found(resource, name)
            return copy.deepcopy(obj)

    def _selected(self, resource: str, ns: str | None, q: dict):
        labels = parse_label_selector(q.get("labelSelector", ""))
        fields = parse_field_selector(q.get("fieldSelector", ""), resource)
        return lambda o: (
            (ns is None or o["metadata"].get("namespace", "") == ns)
            and labels(o["metadata"].get("labels") or {})
            and fields(o)
        )

    def _list(self, resource: str, ns: str | None, q: dict) -> None:
        st = self.state
        if ns is not None:
            self._need_ns(ns)
        match = self._selected(resource, ns, q)
        if _true(q, "watch"):
            return self._watch(resource, match, q)
        with st.lock:
            items = [copy.deepcopy(o) for k, o in sorted(st.objects[resource].items()) if match(o)]
            rv = st.last_rv
        for o in items:
            o.pop("apiVersion", None)
            o.pop("kind", None)
        start = int(base64.b64decode(q["continue"]).decode()) if q.get("continue") else 0
        limit = int(q.get("limit") or 0)
        md: dict = {"resourceVersion": str(rv)}
        if limit and start + limit < len(items):
            md["continue"] = base64.b64encode(str(start + limit).encode()).decode()
            md["remainingItemCount"] = len(items) - start - limit
        items = items[start : start + limit] if limit else items[start:]
        self._json(200, {"kind": KINDS[resource] + "List", "apiVersion": "v1", "metadata": md, "items": items})

    def _watch(self, resource: str, match, q: dict) -> None:
        st = self.state
        timeout = float(q.get("timeoutSeconds") or 1800)
        end = time.time() + timeout
        since = q.get("resourceVersion") or ""
        self._start_chunked("application/json")
        with st.lock:
            if since in ("", "0"):
                pending = [("ADDED", copy.deepcopy(o)) for _, o in sorted(st.objects[resource].items()) if match(o)]
                pos = len(st.history)
            else:
                pending = []
                pos = next((i for i, h in enumerate(st.history) if h[0] > int(since)), len(st.history))
        while True:
            for kind, obj in pending:
                self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            pending = []
            with st.lock:
                while pos >= len(st.history) and time.time() < end and not self._stopping():
                    st.cond.wait(min(0.5, max(0.01, end - time.time())))
                for rv, res, kind, obj in st.history[pos:]:
                    if res == resource and match(obj):
                        pending.append((kind, copy.deepcopy(obj)))
                pos = len(st.history)
            if not pending and (time.time() >= end or self._stopping()):
                break
        if not self._stopping():
            self._end_chunked()
        else:
            self.close_connection = True

    def _need_ns(self, ns: str) -> None:
        if ("", ns) not in self.state.objects["namespaces"]:
            raise not_found("namespaces", ns)

    def _create(self, resource: str, ns: str, body, q: dict) -> None:
        st = self.state
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        obj = copy.deepcopy(body)
        md = obj.setdefault("metadata", {})
        if not md.get("name") and md.get("generateName"):
            md["name"] = md["generateName"] + uuid.uuid4().hex[:5]
        kind = KINDS[resource]
        with st.lock:
            if resource != "namespaces":
                self._need_ns(ns)
                if md.get("namespace") and md["namespace"] != ns:
                    raise ApiError(
                        400,
                        "BadRequest",
                        "the namespace of the provided object does not match the namespace sent on the request",
                    )
            if resource == "pods":
                causes = _validate_pod(obj)
                if causes:
                    raise invalid(kind, md.get("name", ""), causes)
                _default_pod(obj)
            elif not md.get("name") or (resource != "events" and not DNS_SUBDOMAIN.fullmatch(md["name"])):
                raise invalid(
                    kind, md.get("name", ""), [("metadata.name", "Required value: name or generateName is required")]
                )
            if resource == "secrets":
                data = dict(obj.get("data") or {})
                for k, v in (obj.pop("stringData", None) or {}).items():
                    data[k] = base64.b64encode(v.encode()).decode()
                for k, v in data.items():
                    try:
                        base64.b64decode(v, validate=True)
                    except ValueError:
                        raise invalid(kind, md["name"], [(f"data[{k}]", "Invalid value: illegal base64 data")])
                obj["data"] = data
                obj.setdefault("type", "Opaque")
            if (ns, md["name"]) in st.objects[resource]:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{resource} "{md["name"]}" already exists',
                    {"name": md["name"], "kind": resource},
                )
            if q.get("dryRun"):
                md.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), namespace=ns)
                obj["apiVersion"], obj["kind"] = "v1", kind
                return self._json(201, obj)
            obj = st.create(resource, ns, obj)
            out = copy.deepcopy(obj)
            if resource == "pods" and not st.closed:
                run = _PodRun(st, obj)
                st.runs[run.uid] = run
                run.thread.start()
        self._json(201, out)

    def _update(self, resource: str, ns: str, name: str, body, q: dict, method: str) -> None:
        st = self.state
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        with st.lock:
            cur = st.objects[resource].get((ns, name))
            if cur is None:
                raise not_found(resource, name)
            if method == "PUT":
                new = copy.deepcopy(body)
                rv = (new.get("metadata") or {}).get("resourceVersion")
                if rv and rv != cur["metadata"]["resourceVersion"]:
                    raise ApiError(
                        409,
                        "Conflict",
                        f'Operation cannot be fulfilled on {resource} "{name}": {MSG_MODIFIED}',
                        {"name": name, "kind": resource},
                    )
            elif ctype == "application/json-patch+json":
                new = json_patch(cur, body if isinstance(body, list) else [])
            elif ctype in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
                "application/json",
            ):
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
                new = merge_patch(cur, body)
            else:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    MSG_MEDIA,
                )
            # server-owned fields survive; pods only take metadata changes
            md = new.setdefault("metadata", {})
            for k in (
                "uid",
                "creationTimestamp",
                "namespace",
                "name",
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ):
                if k in cur["metadata"]:
                    md[k] = cur["metadata"][k]
            if resource == "pods":
                if new.get("spec") != cur.get("spec"):
                    raise invalid(
                        "Pod",
                        name,
                        [
                            (
                                "spec",
                                MSG_POD_UPDATE,
                            )
                        ],
                    )
                causes = [c for c in _validate_pod(new) if c[0].startswith("metadata")]
                if causes:
                    raise invalid("Pod", name, causes)
                new["status"] = cur["status"]
            if resource == "secrets":
                data = dict(new.get("data") or {})
                for k, v in (new.pop("stringData", None) or {}).items():
                    data[k] = base64.b64encode(v.encode()).decode()
                new["data"] = data
            new["apiVersion"], new["kind"] = "v1", KINDS[resource]
            if q.get("dryRun"):
                return self._json(200, new)
            cur.clear()
            cur.update(new)
            st.record(resource, "MODIFIED", cur)
            out = copy.deepcopy(cur)
        self._json(200, out)

    def _delete(self, resource: str, ns: str, name: str, body, q: dict) -> None:
        self._json(200, self._delete_one(resource, ns, name, body if isinstance(body, dict) else {}, q))

    def _delete_collection(self, resource: str, ns: str, body, q: dict) -> None:
        """deletecollection: every object the label/field selectors match, each as a single DELETE would."""
        match = self._selected(resource, ns, q)
        with self.state.lock:
            names = [n for (_, n), o in sorted(self.state.objects[resource].items()) if match(o)]
            for n in names:
                self._delete_one(resource, ns, n, body if isinstance(body, dict) else {}, q)
        self._json(
            200,
            {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": {"kind": resource}},
        )

    def _delete_one(self, resource: str, ns: str, name: str, opts: dict, q: dict) -> dict:
        st = self.state
        grace = opts.get("gracePeriodSeconds", q.get("gracePeriodSeconds"))
        with st.lock:
            cur = st.objects[resource].get((ns, name))
            if cur is None:
                raise not_found(resource, name)
            pre = opts.get("preconditions") or {}
            for k in ("uid", "resourceVersion"):
                if pre.get(k) and pre[k] != cur["metadata"][k]:
                    raise ApiError(
                        409,
                        "Conflict",
                        f"Precondition failed: {k} in precondition: {pre[k]}, {k} in object meta: {cur['metadata'][k]}",
                    )
            if q.get("dryRun"):
                return copy.deepcopy(cur)
            if resource != "pods":
                st.remove(resource, ns, name)
                return {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {"name": name, "kind": resource, "uid": cur["metadata"]["uid"]},
                }
            grace = float(cur["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else grace)
            run = st.runs.get(cur["metadata"]["uid"])
            live = run is not None and not run.finished and any(p.poll() is None for p in run.procs.values())
            if run is None or run.finished or not live or grace <= 0:
                if run is not None and not run.finished:
                    run.terminate(0)
                st.remove("pods", ns, name)
                if run is not None and run.finished:
                    run._cleanup()
                out = copy.deepcopy(cur)
            else:
                if "deletionTimestamp" not in cur["metadata"] or grace < run.grace:
                    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=grace)
                    cur["metadata"]["deletionTimestamp"] = t.strftime("%Y-%m-%dT%H:%M:%SZ")
                    cur["metadata"]["deletionGracePeriodSeconds"] = int(grace)
                    st.record("pods", "MODIFIED", cur)
                run.terminate(grace)
                out = copy.deepcopy(cur)
        return out

    # --------------------------------------------------------------------------------------------- logs

    def _log(self, ns: str, name: str, q: dict) -> None:
        st = self.state
        pod = self._get("pods", ns, name)
        names = [c["name"] for c in pod["spec"]["containers"]]
        inits = [c["name"] for c in pod["spec"].get("initContainers") or []]
        container = q.get("container")
        if not container:
            if len(names) != 1:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]"
                    + (f" or one of the init containers: [{' '.join(inits)}]" if inits else ""),
                )
            container = names[0]
        if container not in names + inits:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        if _true(q, "previous"):
            raise ApiError(400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" not found')
        uid = pod["metadata"]["uid"]
        with st.lock:
            log = st.logs.get((uid, container))
            if log is None or not log.started:
                statuses = (pod["status"].get("containerStatuses") or []) + (
                    pod["status"].get("initContainerStatuses") or []
                )
                reason = (
                    next(
                        (s["state"].get("waiting", {}).get("reason") for s in statuses if s["name"] == container), None
                    )
                    or "ContainerCreating"
                )
                raise ApiError(
                    400, "BadRequest", f'container "{container}" in pod "{name}" is waiting to start: {reason}'
                )
        follow = _true(q, "follow")
        stamps = _true(q, "timestamps")
        since_ns = 0
        if q.get("sinceSeconds"):
            since_ns = time.time_ns() - int(q["sinceSeconds"]) * 10**9
        elif q.get("sinceTime"):
            since_ns = _parse_time_ns(q["sinceTime"])
        tail = int(q["tailLines"]) if q.get("tailLines") not in (None, "") else None
        limit = int(q["limitBytes"]) if q.get("limitBytes") else None

        def render(lines) -> bytes:
            return b"".join(
                (_rfc3339nano(t).encode() + b" " if stamps else b"") + line for t, line in lines if t >= since_ns
            )

        with st.lock:
            lines = [x for x in log.lines if x[0] >= since_ns]
            if tail is not None:
                lines = lines[-tail:] if tail else []
            pos = len(log.lines)
            done = log.done
        first = render(lines)
        if not follow or done:
            return self._send(200, first[:limit] if limit is not None else first, "text/plain")
        self._start_chunked("text/plain")
        sent = 0
        data = first
        while True:
            if limit is not None:
                data = data[: max(0, limit - sent)]
            self._chunk(data)
            sent += len(data)
            if limit is not None and sent >= limit:
                break
            with st.lock:
                while (
                    pos >= len(log.lines)
                    and not log.done
                    and not self._stopping()
                    and st.logs.get((uid, container)) is log
                ):
                    st.cond.wait(0.5)
                new = log.lines[pos:]
                pos = len(log.lines)
                finished = log.done or self._stopping() or st.logs.get((uid, container)) is not log
            data = render(new)
            if finished and not data:
                break
        if self._stopping():
            self.close_connection = True
        else:
            self._end_chunked()


# -------------------------------------------------------------------------------------------------- server


class KubeApiServer:
    """`with KubeApiServer(workdir) as kube:` serves a Kubernetes API on `kube.url`; `kube.kubeconfig` points at it.

    images: image name (exact, without tag, or an fnmatch pattern) -> `Image` or an argv list (the entrypoint).
    extra_env: environment every container process gets (what an image would bake in, e.g. PYTHONPATH).
    nodes: the nodes pods may be scheduled on (default: one `Node()` with the usual kubernetes.io labels).
    timing: seconds for "schedule" (before binding), "pull" (before each container starts), "retry" (config errors).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        port: int = 0,
        images: dict | None = None,
        extra_env: dict[str, str] | None = None,
        nodes: list[Node] | None = None,
        namespaces: tuple[str, ...] = ("default", "kube-system"),
        token: str | None = TOKEN,
        timing: dict | None = None,
        tls: bool = False,
    ):
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state = KubeState(self.workdir, nodes or [Node()], images or {}, extra_env or {}, namespaces, timing)
        self.token = token
        self.port = port
        self.httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.kubeconfig = self.workdir / "kubeconfig"
        self.tls = tls
        self.ca_cert = self.workdir / "tls" / "cert.pem"  # with tls: the server's self-signed cert, its own CA

    # ----------------------------------------------------------------------------------------- lifecycle

    def start_api(self) -> None:
        handler = type("Handler", (_Handler,), {"state": self.state, "token": self.token})
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler, bind_and_activate=False)
        httpd.allow_reuse_address = True
        httpd.daemon_threads = False
        httpd.block_on_close = True
        httpd.server_bind()
        httpd.server_activate()
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self._certificate())
            httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True, do_handshake_on_connect=False)
        httpd.handle_error = lambda request, address: None  # clients that hang up, failed TLS handshakes
        httpd.stopping = threading.Event()
        httpd.owner = self
        httpd.conns = set()
        httpd.conn_lock = threading.Lock()
        self.httpd = httpd
        self.port = self.state.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="kube-stand-in-api", daemon=True
        )
        self._thread.start()
        self.write_kubeconfig(self.kubeconfig)

    def _certificate(self) -> tuple[Path, Path]:
        """A self-signed certificate for 127.0.0.1 / localhost (made once per workdir with the `openssl` CLI)."""
        key = self.ca_cert.with_name("key.pem")
        if not self.ca_cert.exists():
            self.ca_cert.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
                + ["-keyout", str(key), "-out", str(self.ca_cert), "-days", "7", "-subj", "/CN=kube-stand-in"]
                + [
                    "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                ],
                check=True,
                capture_output=True,
            )
        return self.ca_cert, key

    def stop_api(self) -> None:
        """The HTTP side goes away (listening socket and open connections, watches and log streams included);
        pods keep running and the state is kept."""
        httpd = self.httpd
        if httpd is None:
            return
        self.httpd = None
        httpd.stopping.set()
        with self.state.lock:
            self.state.cond.notify_all()
        httpd.shutdown()
        with httpd.conn_lock:
            conns = list(httpd.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()  # joins the handler threads
        self._thread.join(5)

    def restart_api(self, downtime: float = 0.0) -> None:
        """As a restarted API server: clients lose their connections and reconnect to the same port."""
        self.stop_api()
        time.sleep(downtime)
        self.start_api()

    def add_image(self, name: str, image: Image | list[str]) -> None:
        """Register what an image runs when a container gives no `command` (see `Image`)."""
        with self.state.lock:
            self.state.images[name] = image if isinstance(image, Image) else Image(list(image))

    def __enter__(self) -> KubeApiServer:
        self.start_api()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill every pod's processes (SIGKILL, no grace), stop the kubelet and the API; nothing is left running."""
        st = self.state
        with st.lock:
            st.closed = True
            runs = list(st.runs.values())
            for r in runs:
                r.grace = 0
                r.stop.set()
        for r in runs:
            r._kill_all(0)
            r.thread.join(10)
            for t in list(r.threads):
                t.join(10)
        self.stop_api()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def write_kubeconfig(self, path: str | os.PathLike, namespace: str = "default") -> Path:
        """A kubeconfig (JSON, which is YAML) for this server: cluster `kube-stand-in` (plain HTTP, or with tls its CA
        certificate), a token user."""
        if self.tls:
            cluster = {
                "server": self.url,
                "certificate-authority-data": base64.b64encode(self.ca_cert.read_bytes()).decode(),
            }
        else:
            cluster = {"server": self.url, "insecure-skip-tls-verify": True}
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kube-stand-in", "cluster": cluster}],
            "users": [{"name": "kube-stand-in", "user": {"token": self.token} if self.token else {}}],
            "contexts": [
                {
                    "name": "kube-stand-in",
                    "context": {"cluster": "kube-stand-in", "user": "kube-stand-in", "namespace": namespace},
                }
            ],
            "current-context": "kube-stand-in",
            "preferences": {},
        }
        path = Path(path)
        path.write_text(json.dumps(cfg, indent=2))
        return path

    # ------------------------------------------------------------------------------------------ test knobs

    def set_nodes(self, nodes: list[Node]) -> None:
        with self.state.lock:
            self.state.nodes = list(nodes)
        self._reschedule()

    def add_node_labels(self, labels: dict[str, str], node: int = 0) -> None:
        with self.state.lock:
            self.state.nodes[node].labels.update(labels)
        self._reschedule()

    def _reschedule(self) -> None:
        with self.state.lock:
            for r in self.state.runs.values():
                r.reschedule.set()

    def fail_next(self, pattern: str, times: int = 1, exit_code: int = 1, after: float = 0.0) -> None:
        """The next `times` pods whose name matches `pattern` (fnmatch) run, in place of their first container's
        command, a process that prints one line, waits `after` seconds and exits with `exit_code`."""
        with self.state.lock:
            self.state.failures.append([pattern, times, exit_code, after])

    def fail_pulls(self, image: str, failing: bool = True) -> None:
        """Containers of `image` wait in ErrImagePull (with a Failed event) until `fail_pulls(image, False)`."""
        with self.state.lock:
            (self.state.bad_images.add if failing else self.state.bad_images.discard)(image)

    def fail_requests(self, method: str, path_regex: str, status: int = 500, times: int = 1) -> None:
        """The next `times` requests (method or "*", path matching the regex) are answered `status`."""
        with self.state.lock:
            self.state.request_failures.append([method, path_regex, status, times])

    # ------------------------------------------------------------------------------------------- readers

    @property
    def requests(self) -> list[Request]:
        with self.state.lock:
            return list(self.state.requests)

    def pod_specs(self) -> list[str]:
        """The bodies of every pod creation, update and patch received (to check what went into pod specs)."""
        return [
            r.body
            for r in self.requests
            if re.fullmatch(r"/api/v1/namespaces/[^/]+/pods(/[^/]+)?", r.path) and r.method in ("POST", "PUT", "PATCH")
        ]

    def pod(self, name: str, namespace: str = "default") -> dict | None:
        with self.state.lock:
            obj = self.state.objects["pods"].get((namespace, name))
            return copy.deepcopy(obj) if obj else None

    def pods(self, namespace: str | None = None) -> list[dict]:
        with self.state.lock:
            return [
                copy.deepcopy(o) for (ns, _), o in sorted(self.state.objects["pods"].items()) if namespace in (None, ns)
            ]

    def logs(self, name: str, container: str | None = None, namespace: str = "default") -> str:
        with self.state.lock:
            pod = self.state.objects["pods"].get((namespace, name))
            if pod is None:
                return ""
            container = container or pod["spec"]["containers"][0]["name"]
            log = self.state.logs.get((pod["metadata"]["uid"], container))
            return b"".join(line for _, line in log.lines).decode("utf-8", "replace") if log else ""

    def events(self, name: str | None = None, namespace: str = "default") -> list[dict]:
        with self.state.lock:
            return [
                copy.deepcopy(e)
                for (ns, _), e in sorted(
                    self.state.objects["events"].items(), key=lambda kv: kv[1]["metadata"]["resourceVersion"]
                )
                if ns == namespace and (name is None or e["involvedObject"]["name"] == name)
            ]

    def where(self, text: str) -> list[str]:
        """Everywhere `text` was seen: request bodies ("POST /api/v1/..."), container logs of current and deleted
        pods ("log ns/pod/container"), events ("event ns/name"), pod objects ("pod ns/name"). For checks such as
        "the token is in the Secret only": `kube.where(token) == ["POST /api/v1/namespaces/ns/secrets"]`."""
        out = []
        with self.state.lock:
            for r in self.state.requests:
                if r.path.startswith("/stand-in/"):
                    continue
                if text in r.body or text in urllib.parse.unquote(r.path) or text in json.dumps(r.query):
                    out.append(f"{r.method} {r.path}")
            names = {p["metadata"]["uid"]: (ns, n) for (ns, n), p in self.state.objects["pods"].items()}
            logs = [(*names.get(uid, ("?", "?")), c, log) for (uid, c), log in self.state.logs.items()]
            for ns, pod, c, log in self.state.removed_logs + logs:
                if any(text.encode() in line for _, line in log.lines):
                    out.append(f"log {ns}/{pod}/{c}")
            for resource in ("events", "pods", "configmaps"):
                for (ns, n), obj in self.state.objects[resource].items():
                    if text in json.dumps(obj):
                        out.append(f"{resource[:-1]} {ns}/{n}")
        return out

    def pvc_path(self, claim: str, namespace: str = "default") -> Path:
        """The local folder standing for a persistentVolumeClaim (shared by every pod that mounts the claim)."""
        return self.workdir / "pvc" / namespace / claim

    def csi_path(self, driver: str, bucket: str, only_dir: str = "") -> Path:
        """The local folder standing for a CSI volume (GCS FUSE: its bucket, and `only-dir` folder if mounted so)."""
        opts = f"only-dir={only_dir}" if only_dir else ""
        return csi_folder(
            self.workdir, {"driver": driver, "volumeAttributes": {"bucketName": bucket, "mountOptions": opts}}
        )

    def wait_for(self, predicate, timeout: float = 10.0, interval: float = 0.02):
        """Poll `predicate()` until truthy; returns its value, raises TimeoutError."""
        end = time.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.time() > end:
                raise TimeoutError(f"condition not met within {timeout}s")
            time.sleep(interval)

    def wait_phase(
        self, name: str, phases=("Succeeded", "Failed"), namespace: str = "default", timeout: float = 10.0
    ) -> dict:
        if isinstance(phases, str):
            phases = (phases,)
        return self.wait_for(lambda: (p := self.pod(name, namespace)) and p["status"]["phase"] in phases and p, timeout)

    def pids(self) -> list[int]:
        """Process ids of every container process started (alive or not)."""
        with self.state.lock:
            return list(self.state.all_pids)


def kube_env(kubeconfig: str | os.PathLike, *, kubeconfig_var: bool = False) -> dict[str, str]:
    """Environment pointing Airflow's `kubernetes_default` connection (extra `kube_config_path`) at a kubeconfig, e.g.
    the Kubernetes API stand-in's; for this or child processes. `kubeconfig_var` also sets KUBECONFIG, which the
    provider must NOT see together with the connection: a deferrable KubernetesPodOperator loads $KUBECONFIG into the
    trigger's `config_dict`, and the trigger's hook then refuses a connection that also has `kube_config_path`
    ("Options kube_config_path, kube_config, in_cluster, and config_dict are mutually exclusive")."""
    conn = {"conn_type": "kubernetes", "extra": {"kube_config_path": str(kubeconfig), "namespace": "default"}}
    env = {"AIRFLOW_CONN_KUBERNETES_DEFAULT": json.dumps(conn)}
    if kubeconfig_var:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.stand_ins.kube_api", description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--image", action="append", default=[], metavar="IMAGE=ARGV", help="default entrypoint of an image")
    ap.add_argument("--node-label", action="append", default=[], metavar="K=V")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="environment of every container")
    ap.add_argument("--namespace", action="append", default=[], help="namespaces (default: default, kube-system)")
    ap.add_argument("--tls", action="store_true", help="HTTPS with a self-signed certificate (CA in the kubeconfig)")
    ap.add_argument("--token", default=TOKEN, help="the bearer token clients must send ('' for none)")
    a = ap.parse_args(argv)
    images = {k: shlex.split(v) for k, _, v in (s.partition("=") for s in a.image)}
    labels = dict(s.split("=", 1) for s in a.node_label)
    env = dict(s.split("=", 1) for s in a.env)
    server = KubeApiServer(
        a.workdir,
        port=a.port,
        images=images,
        extra_env=env,
        nodes=[Node(labels=labels)],
        namespaces=tuple(a.namespace) or ("default", "kube-system"),
        tls=a.tls,
        token=a.token or None,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with server:
        print(server.kubeconfig, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()

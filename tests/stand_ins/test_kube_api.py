"""The Kubernetes API stand-in, driven by the real `kubernetes` / `kubernetes_asyncio` clients and the real
cncf.kubernetes provider (PodManager, AsyncKubernetesHook, KubernetesPodTrigger) through a kubeconfig."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from kubernetes import client, config, watch

from operators.embedded import session_home
from tests.stand_ins.fixtures import kube  # noqa: F401
from tests.stand_ins.kube_api import TOKEN, KubeApiServer, Node, rewrite_paths

session_home()  # the provider tests import Airflow: a throwaway home, as the Airflow suites have
PY = sys.executable
REPO = Path(__file__).resolve().parents[2]


def api(server) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(str(server.kubeconfig)))


def log_text(v1: client.CoreV1Api, name: str, **kw) -> str:
    """A pod's log as the provider reads it (`_preload_content=False`: the client turns a preloaded text/plain
    body into the repr of its bytes)."""
    return v1.read_namespaced_pod_log(name, "default", _preload_content=False, **kw).data.decode()


def pod_body(name: str, code: str, *, env=None, env_from=None, mounts=None, volumes=None, **spec) -> dict:
    container = {"name": "base", "image": "python:3.11", "command": [PY, "-u", "-c", code]}
    if env:
        container["env"] = env
    if env_from:
        container["envFrom"] = env_from
    if mounts:
        container["volumeMounts"] = mounts
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "ckptflow", "run": name}},
        "spec": {"restartPolicy": "Never", "containers": [container], "volumes": volumes or [], **spec},
    }


def test_pod_runs_with_secret_env_and_empty_dir(kube):
    v1 = api(kube)
    v1.create_namespaced_secret(
        "default", client.V1Secret(metadata=client.V1ObjectMeta(name="hf"), string_data={"token": "hf_SECRET"})
    )
    code = (
        "import json, os, sys, time\n"
        "print('token', os.environ['HF_TOKEN'], os.environ['FROM_PREFIX_token'], os.environ['POD'])\n"
        "open(sys.argv[1], 'w').write('written')\n"
        "print('mounts', os.environ['KUBE_STANDIN_MOUNTS'])\n"
        "print('to stderr', file=sys.stderr)\n"
        "time.sleep(0.6)\n"
        "print('done')\n"
    )
    body = pod_body(
        "writer",
        code,
        env=[
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        env_from=[{"secretRef": {"name": "hf"}, "prefix": "FROM_PREFIX_"}],
        mounts=[{"name": "scratch", "mountPath": "/data"}],
        volumes=[{"name": "scratch", "emptyDir": {}}],
    )
    body["spec"]["containers"][0]["args"] = ["/data/out.txt"]
    created = v1.create_namespaced_pod("default", body)
    assert created.status.phase == "Pending" and created.metadata.uid and created.metadata.creation_timestamp
    phases = [created.status.phase]
    w = watch.Watch()
    for ev in w.stream(
        v1.list_namespaced_pod,
        "default",
        field_selector="metadata.name=writer",
        resource_version=created.metadata.resource_version,
        timeout_seconds=10,
    ):
        phase = ev["object"].status.phase
        if phase != phases[-1]:
            phases.append(phase)
        if phase == "Running" and len(phases) == 2:  # follow the logs while it runs
            chunks = []
            resp = v1.read_namespaced_pod_log(
                "writer", "default", container="base", follow=True, timestamps=True, _preload_content=False
            )
            for chunk in resp.stream(amt=None):
                chunks.append((time.time(), chunk))
            status = kube.pod("writer")["status"]["containerStatuses"][0]["state"]
            assert "terminated" in status  # the stream ends with the container
        if phase in ("Succeeded", "Failed"):
            w.stop()
    assert phases == ["Pending", "Running", "Succeeded"]
    text = b"".join(c for _, c in chunks).decode()
    lines = text.splitlines()
    assert lines[0].split(" ", 1)[1] == "token hf_SECRET hf_SECRET writer"
    assert lines[-1].endswith(" done") and any(line.endswith(" to stderr") for line in lines)
    assert chunks[-1][0] - chunks[0][0] > 0.4  # streamed as written, not at the end
    datetime.datetime.fromisoformat(lines[0].split(" ")[0][:26] + "+00:00")  # RFC 3339 with nanoseconds
    local = json.loads(next(line for line in lines if " mounts " in line).split(" mounts ", 1)[1])["/data"]
    assert Path(local, "out.txt").read_text() == "written"

    pod = v1.read_namespaced_pod("writer", "default")
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (0, "Completed") and term.started_at and term.finished_at
    assert pod.status.pod_ip == pod.status.host_ip == "127.0.0.1" and pod.status.start_time
    assert pod.spec.node_name == "stand-in-node"
    conds = {c.type: c.status for c in pod.status.conditions}
    assert conds["PodScheduled"] == conds["Initialized"] == "True" and conds["Ready"] == "False"
    reasons = [e.reason for e in v1.list_namespaced_event("default", field_selector="involvedObject.name=writer").items]
    assert reasons == ["Scheduled", "Pulled", "Created", "Started"]

    # log parameters
    assert log_text(v1, "writer", tail_lines=1) == "done\n"
    assert log_text(v1, "writer", since_seconds=3600).startswith("token")
    late = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=5)
    assert kube.logs("writer").startswith("token")
    url = f"{kube.url}/api/v1/namespaces/default/pods/writer/log?sinceTime={late.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {kube.token}"})
    assert urllib.request.urlopen(req).read() == b""  # (the python client has no since_time)
    # the emptyDir goes with the pod
    v1.delete_namespaced_pod("writer", "default")
    assert not Path(local).exists()
    with pytest.raises(client.ApiException) as e:
        v1.read_namespaced_pod("writer", "default")
    assert e.value.status == 404 and json.loads(e.value.body)["reason"] == "NotFound"


def test_failing_pods_report_failed_with_exit_code(kube):
    v1 = api(kube)
    v1.create_namespaced_pod("default", pod_body("crash", "import sys; print('boom'); sys.exit(3)"))
    pod = kube.wait_phase("crash")
    assert pod["status"]["phase"] == "Failed"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (3, "Error")
    assert log_text(v1, "crash") == "boom\n"

    # an injected failure: the next pod named like the pattern exits 7 whatever its command
    kube.fail_next("convert-*", times=1, exit_code=7)
    for name in ("convert-a", "convert-b"):
        v1.create_namespaced_pod("default", pod_body(name, "print('ok')"))
    assert kube.wait_phase("convert-a")["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
    assert kube.wait_phase("convert-b")["status"]["phase"] == "Succeeded"

    # activeDeadlineSeconds: killed, Failed, DeadlineExceeded
    v1.create_namespaced_pod("default", pod_body("slow", "import time; time.sleep(30)", activeDeadlineSeconds=1))
    pod = kube.wait_phase("slow", timeout=5)
    assert (pod["status"]["phase"], pod["status"]["reason"]) == ("Failed", "DeadlineExceeded")
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] in (137, 143)

    # an executable that does not exist: StartError 128, as runc reports it
    body = pod_body("noexec", "")
    body["spec"]["containers"][0]["command"] = ["/nonexistent/tool"]
    v1.create_namespaced_pod("default", body)
    term = kube.wait_phase("noexec")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"]) == (128, "StartError")

    # no command: the image's registered entrypoint, with args as CMD
    kube.add_image("ckptflow", [PY, "-c", "import sys; print('entry', *sys.argv[1:])"])
    body = pod_body("entry", "")
    body["spec"]["containers"][0].update(image="ckptflow:0.1", command=None, args=["x", "$(WHO)"])
    body["spec"]["containers"][0]["env"] = [{"name": "WHO", "value": "me"}]
    v1.create_namespaced_pod("default", body)
    assert kube.wait_phase("entry")["status"]["phase"] == "Succeeded"
    assert kube.logs("entry") == "entry x me\n"


def test_unschedulable_pod_stays_pending_until_a_node_fits(kube):
    v1 = api(kube)
    body = pod_body("tpu", "print('on tpu')", nodeSelector={"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite"})
    v1.create_namespaced_pod("default", body)
    events = kube.wait_for(lambda: [e for e in kube.events("tpu") if e["reason"] == "FailedScheduling"])
    assert events[0]["type"] == "Warning" and "didn't match Pod's node affinity/selector" in events[0]["message"]
    time.sleep(0.3)
    pod = v1.read_namespaced_pod("tpu", "default")
    assert pod.status.phase == "Pending" and not pod.status.container_statuses
    cond = next(c for c in pod.status.conditions if c.type == "PodScheduled")
    assert (cond.status, cond.reason) == ("False", "Unschedulable")
    # a TPU request needs the extended resource on the node
    kube.add_node_labels({"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite"})
    assert kube.wait_phase("tpu")["status"]["phase"] == "Succeeded"
    body = pod_body("tpu-res", "print(1)")
    body["spec"]["containers"][0]["resources"] = {"limits": {"google.com/tpu": "4"}}
    body["spec"]["tolerations"] = [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}]
    v1.create_namespaced_pod("default", body)
    ev = kube.wait_for(lambda: [e for e in kube.events("tpu-res") if e["reason"] == "FailedScheduling"])
    assert "Insufficient google.com/tpu" in ev[0]["message"]
    kube.set_nodes(
        [
            Node(
                "tpu-node",
                labels={"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite"},
                taints=[{"key": "google.com/tpu", "value": "present", "effect": "NoSchedule"}],
                allocatable={"cpu": "200", "memory": "400Gi", "google.com/tpu": "4"},
            )
        ]
    )
    pod = kube.wait_phase("tpu-res")
    assert pod["status"]["phase"] == "Succeeded" and pod["spec"]["nodeName"] == "tpu-node"
    v1.create_namespaced_pod("default", pod_body("no-toleration", "print(1)"))
    ev = kube.wait_for(lambda: [e for e in kube.events("no-toleration") if e["reason"] == "FailedScheduling"])
    assert "untolerated taint {google.com/tpu: present}" in ev[0]["message"]


def test_delete_terminates_then_kills_a_running_pod(kube):
    v1 = api(kube)
    polite = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM'), sys.exit(0)))\n"
        "print('up')\n"
        "time.sleep(60)\n"
    )
    v1.create_namespaced_pod("default", pod_body("polite", polite))
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up'); time.sleep(60)"
    v1.create_namespaced_pod("default", pod_body("stubborn", stubborn))
    for name in ("polite", "stubborn"):
        kube.wait_for(lambda: kube.logs(name) == "up\n")
    got = []
    resp = v1.read_namespaced_pod_log("polite", "default", follow=True, _preload_content=False)
    t = threading.Thread(target=lambda: got.extend(resp.stream(amt=None)))
    t.start()
    deleted = v1.delete_namespaced_pod("polite", "default", grace_period_seconds=5)
    assert deleted.metadata.deletion_timestamp is not None
    t.join(5)
    assert b"".join(got) == b"up\ngot SIGTERM\n"
    kube.wait_for(lambda: kube.pod("polite") is None, 5)
    assert [e["reason"] for e in kube.events("polite")][-1] == "Killing"

    t0 = time.time()
    v1.delete_namespaced_pod("stubborn", "default", body=client.V1DeleteOptions(grace_period_seconds=1))
    assert v1.read_namespaced_pod("stubborn", "default").metadata.deletion_grace_period_seconds == 1
    kube.wait_for(lambda: kube.pod("stubborn") is None, 5)
    assert 0.9 < time.time() - t0 < 3  # SIGKILL after the grace period
    for pid in kube.pids():
        assert not Path(f"/proc/{pid}").exists()


def test_api_errors_are_status_objects(kube):
    v1 = api(kube)
    v1.create_namespaced_pod("default", pod_body("dup", "print(1)"))
    cases = [
        (lambda: v1.create_namespaced_pod("default", pod_body("dup", "print(1)")), 409, "AlreadyExists"),
        (lambda: v1.read_namespaced_pod("missing", "default"), 404, "NotFound"),
        (lambda: v1.create_namespaced_pod("nope", pod_body("x", "print(1)")), 404, "NotFound"),
        (lambda: v1.create_namespaced_pod("default", {"metadata": {"name": "Bad_Name"}, "spec": {}}), 422, "Invalid"),
        (lambda: v1.list_namespaced_pod("default", field_selector="spec.bogus=1"), 400, "BadRequest"),
        (lambda: v1.patch_namespaced_pod("dup", "default", {"spec": {"nodeName": "x"}}), 422, "Invalid"),
    ]
    for call, code, reason in cases:
        with pytest.raises(client.ApiException) as e:
            call()
        status = json.loads(e.value.body)
        assert (e.value.status, status["kind"], status["code"], status["reason"]) == (code, "Status", code, reason)
    # merge-patch (dict body) and json-patch (list body) of labels, as the operator marks pods already_checked
    v1.patch_namespaced_pod("dup", "default", {"metadata": {"labels": {"already_checked": "True"}}})
    v1.patch_namespaced_pod("dup", "default", [{"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}])
    sel = "app=ckptflow,run=dup,already_checked!=True,!airflow-worker"
    assert v1.list_namespaced_pod("default", label_selector=sel).items == []
    sel = "app in (ckptflow, other),already_checked=True"
    assert [p.metadata.name for p in v1.list_namespaced_pod("default", label_selector=sel).items] == ["dup"]
    assert v1.read_namespaced_pod("dup", "default").metadata.annotations == {"a": "b"}
    assert v1.list_namespaced_pod("default", field_selector="status.phase=Bogus").items == []
    assert [n.metadata.name for n in v1.list_namespace().items] == ["ckptflow", "default", "kube-system"]
    v1.read_namespace("default")
    # secrets: create, get, list, delete
    v1.create_namespaced_secret("default", {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    assert v1.read_namespaced_secret("s", "default").data == {"k": "dg=="}
    assert [s.metadata.name for s in v1.list_namespaced_secret("default").items] == ["s"]
    v1.delete_namespaced_secret("s", "default")
    assert v1.list_namespaced_secret("default").items == []
    for i in range(3):
        labels = {"ckptflow/run": "r1" if i < 2 else "r2"}
        v1.create_namespaced_secret(
            "default", {"metadata": {"name": f"s{i}", "labels": labels}, "stringData": {"k": "v"}}
        )
    v1.delete_collection_namespaced_secret("default", label_selector="ckptflow/run=r1")
    assert [s.metadata.name for s in v1.list_namespaced_secret("default").items] == ["s2"]
    # a wrong token
    bad = client.Configuration()
    bad.host, bad.api_key = kube.url, {"authorization": "Bearer nope"}
    with pytest.raises(client.ApiException) as e:
        client.CoreV1Api(client.ApiClient(bad)).list_namespaced_pod("default")
    assert e.value.status == 401
    assert any(r.method == "POST" and r.path.endswith("/secrets") and "stringData" in r.body for r in kube.requests)


def test_api_restart_keeps_pods_running(kube):
    v1 = api(kube)
    v1.create_namespaced_pod("default", pod_body("long", "import time; print('a'); time.sleep(1.2); print('b')"))
    kube.wait_phase("long", "Running")
    port = kube.port
    kube.restart_api(downtime=0.3)
    assert kube.port == port
    pod = api(kube).read_namespaced_pod("long", "default")
    assert pod.status.phase == "Running" and pod.status.container_statuses[0].restart_count == 0
    assert kube.wait_phase("long")["status"]["phase"] == "Succeeded"
    assert log_text(v1, "long") == "a\nb\n"


def test_tls_with_the_ca_in_the_kubeconfig(tmp_path):
    """HTTPS as a GKE endpoint: the clients verify the stand-in's certificate with the kubeconfig's CA."""
    import kubernetes_asyncio.client as async_client
    import kubernetes_asyncio.config as async_config

    with KubeApiServer(tmp_path, tls=True) as server:
        assert server.url.startswith("https://")
        v1 = api(server)
        v1.create_namespaced_pod("default", pod_body("tls", "print('over tls')"))
        server.wait_phase("tls")
        assert log_text(v1, "tls") == "over tls\n"

        async def read():
            cfg = async_client.Configuration()
            await async_config.load_kube_config(config_file=str(server.kubeconfig), client_configuration=cfg)
            async with async_client.ApiClient(cfg) as c:
                return (await async_client.CoreV1Api(c).read_namespaced_pod("tls", "default")).status.phase

        assert asyncio.run(read()) == "Succeeded"
        insecure = client.Configuration()  # no CA: the certificate is refused
        insecure.host = server.url
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            client.CoreV1Api(client.ApiClient(insecure)).list_namespace(_request_timeout=5)
        server.restart_api()
        assert [n.metadata.name for n in api(server).list_namespace().items] == ["default", "kube-system"]
    assert not [t.name for t in threading.enumerate() if t.name.startswith("kube-stand-in")]


def test_mount_rewriting():
    m = {"/data": "/tmp/w/d", "/data/sub": "/tmp/w/s", "/mnt/x": "/tmp/w/x"}
    assert rewrite_paths("/data", m) == "/tmp/w/d"
    assert rewrite_paths("--out=/data/a,/data/sub/b", m) == "--out=/tmp/w/d/a,/tmp/w/s/b"
    assert (
        rewrite_paths("/database /x/data gs://b/data /mnt/xy a:/mnt/x", m)
        == "/database /x/data gs://b/data /mnt/xy a:/tmp/w/x"
    )


def test_volumes_pvc_hostpath_secret_and_init_containers(kube, tmp_path):
    v1 = api(kube)
    v1.create_namespaced_secret("default", {"metadata": {"name": "cfg"}, "stringData": {"a.txt": "A"}})
    host = tmp_path / "host"
    code = (
        "import os, sys\n"
        "same = os.getcwd() == os.path.realpath('/ckpt')\n"
        "print(open('/etc/cfg/a.txt').read(), open('/ckpt/from-init').read(), same)\n"
        "open(os.path.join('/host', 'h.txt'), 'w').write('h')\n"
    )
    body = pod_body(
        "vols",
        code,
        mounts=[
            {"name": "cfg", "mountPath": "/etc/cfg"},
            {"name": "ckpt", "mountPath": "/ckpt"},
            {"name": "host", "mountPath": "/host"},
        ],
        volumes=[
            {"name": "cfg", "secret": {"secretName": "cfg"}},
            {"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}},
            {"name": "host", "hostPath": {"path": str(host), "type": "DirectoryOrCreate"}},
        ],
    )
    body["spec"]["containers"][0]["workingDir"] = "/ckpt"
    body["spec"]["initContainers"] = [
        {
            "name": "init",
            "image": "python:3.11",
            "command": [PY, "-c", "open('/ckpt/from-init', 'w').write('I')"],
            "volumeMounts": [{"name": "ckpt", "mountPath": "/ckpt"}],
        }
    ]
    v1.create_namespaced_pod("default", body)
    pod = kube.wait_phase("vols")
    assert pod["status"]["phase"] == "Succeeded", kube.logs("vols")
    assert pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed"
    assert kube.logs("vols") == "A I True\n" and (host / "h.txt").read_text() == "h"
    assert (kube.workdir / "pvc" / "default" / "ckpt" / "from-init").read_text() == "I"
    # a missing secret: ContainerCreating with FailedMount events, then it runs once the secret exists
    body = pod_body("waits", "print(open('/s/k').read())", mounts=[{"name": "s", "mountPath": "/s"}])
    body["spec"]["volumes"] = [{"name": "s", "secret": {"secretName": "later"}}]
    v1.create_namespaced_pod("default", body)
    kube.wait_for(lambda: any(e["reason"] == "FailedMount" for e in kube.events("waits")))
    assert kube.pod("waits")["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ContainerCreating"
    v1.create_namespaced_secret("default", {"metadata": {"name": "later"}, "stringData": {"k": "K"}})
    assert kube.wait_phase("waits")["status"]["phase"] == "Succeeded" and kube.logs("waits") == "K\n"


def test_project_shaped_pods_share_a_gcsfuse_volume(kube, tmp_path):
    """Pods as operators.kubernetes builds them: namespace ckptflow, `command: [ckptflow]` looked up on the image's
    PATH, a GCS FUSE CSI work volume (one folder per bucket and only-dir, shared by the pods), HF_TOKEN from a Secret,
    a non-root security context, a service account, TPU-style node selector and toleration."""
    from tests.stand_ins.kube_api import Image

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "ckptflow"
    tool.write_text(
        f"#!{PY}\n"
        "import os, pathlib, sys\n"
        "cmd, path = sys.argv[1:3]\n"
        "if cmd == 'write':\n"
        "    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)\n"
        "    pathlib.Path(path).write_text(f'token of {len(os.environ[\"HF_TOKEN\"])} chars')\n"
        "print(cmd, pathlib.Path(path).read_text())\n"
    )
    tool.chmod(0o755)
    kube.add_image("ckptflow-converter", Image(env={"PATH": f"{bin_dir}:/usr/bin:/bin"}))
    kube.add_node_labels({"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice"})
    v1 = api(kube)
    v1.create_namespaced_secret("ckptflow", {"metadata": {"name": "hf-run-1"}, "stringData": {"token": "hf_abcdef"}})
    driver = "gcsfuse.csi.storage.gke.io"
    volume = {
        "name": "ckptflow-work",
        "csi": {
            "driver": driver,
            "volumeAttributes": {
                "bucketName": "ckpt-bucket",
                "mountOptions": "implicit-dirs,uid=1000,gid=0,only-dir=w",
            },
        },
    }
    for name, args in (
        ("ckptflow-download", ["write", "/ckptflow-work/run1/a.txt"]),
        ("ckptflow-verify", ["read", "/ckptflow-work/run1/a.txt"]),
    ):
        body = {
            "metadata": {
                "name": name,
                "labels": {"app.kubernetes.io/name": "ckptflow"},
                "annotations": {"gke-gcsfuse/volumes": "true"},
            },
            "spec": {
                "restartPolicy": "Never",
                "serviceAccountName": "ckptflow",
                "securityContext": {"runAsUser": 1000, "runAsGroup": 0, "fsGroup": 0, "runAsNonRoot": True},
                "nodeSelector": {"cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice"},
                "tolerations": [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}],
                "volumes": [volume],
                "containers": [
                    {
                        "name": "base",
                        "image": "ckptflow-converter:latest",
                        "command": ["ckptflow"],
                        "args": args,
                        "env": [
                            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-run-1", "key": "token"}}}
                        ],
                        "volumeMounts": [{"name": "ckptflow-work", "mountPath": "/ckptflow-work"}],
                    }
                ],
            },
        }
        v1.create_namespaced_pod("ckptflow", body)
        pod = kube.wait_phase(name, namespace="ckptflow")
        assert pod["status"]["phase"] == "Succeeded", kube.logs(name, namespace="ckptflow")
    assert kube.logs("ckptflow-verify", namespace="ckptflow") == "read token of 9 chars\n"
    assert (kube.csi_path(driver, "ckpt-bucket", "w") / "run1" / "a.txt").read_text() == "token of 9 chars"
    assert kube.where("hf_abcdef") == ["POST /api/v1/namespaces/ckptflow/secrets"]


def test_provider_pod_manager_sync(kube, capsys):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodManager
    from kubernetes.client import models as k8s

    hook = KubernetesHook(conn_id="kubernetes_default")
    pm = PodManager(kube_client=hook.core_v1_client)
    pod = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="kpo", namespace="default", labels={"dag_id": "d", "task_id": "t"}),
        spec=k8s.V1PodSpec(
            restart_policy="Never",
            containers=[
                k8s.V1Container(
                    name="base",
                    image="python:3.11",
                    command=[PY, "-u", "-c", "import time\nfor i in range(3):\n    print('line', i); time.sleep(0.2)"],
                )
            ],
        ),
    )
    pm.create_pod(pod)
    asyncio.run(pm.await_pod_start(pod, schedule_timeout=10, startup_timeout=10, check_interval=0.1))
    statuses = pm.fetch_requested_container_logs(pod, "base", follow_logs=True)
    assert [s.running for s in statuses] == [False]
    out = capsys.readouterr().out  # Airflow's structlog writes the task log lines to stdout here
    assert [line for line in ("[base] line 0", "[base] line 1", "[base] line 2") if line in out] == [
        "[base] line 0",
        "[base] line 1",
        "[base] line 2",
    ]
    assert out.index("[base] line 0") < out.index("[base] line 2")
    remote = pm.await_pod_completion(pod)
    assert remote.status.phase == "Succeeded"
    assert [e.reason for e in pm.read_pod_events(pod).items][:2] == ["Scheduled", "Pulled"]
    pm.delete_pod(remote)
    pm.delete_pod(remote)  # a 404 is fine
    assert kube.pod("kpo") is None

    # a pod that never gets scheduled times out in await_pod_start with the provider's message
    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodLaunchTimeoutException

    stuck = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="stuck", namespace="default"),
        spec=k8s.V1PodSpec(restart_policy="Never", node_selector={"pool": "none"}, containers=pod.spec.containers),
    )
    pm.create_pod(stuck)
    with pytest.raises(PodLaunchTimeoutException, match="too long to be scheduled"):
        asyncio.run(pm.await_pod_start(stuck, schedule_timeout=1, startup_timeout=1, check_interval=0.2))


def test_provider_sees_pull_errors_and_retries_api_errors(kube):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from airflow.providers.cncf.kubernetes.utils.pod_manager import PodLaunchFailedException, PodManager
    from kubernetes.client import models as k8s

    pm = PodManager(kube_client=KubernetesHook(conn_id="kubernetes_default").core_v1_client)
    kube.fail_pulls("registry.example/missing:1")
    pod = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="nopull", namespace="default"),
        spec=k8s.V1PodSpec(
            restart_policy="Never", containers=[k8s.V1Container(name="base", image="registry.example/missing:1")]
        ),
    )
    pm.create_pod(pod)
    with pytest.raises(PodLaunchFailedException, match="Image cannot be pulled"):
        asyncio.run(pm.await_pod_start(pod, schedule_timeout=5, startup_timeout=5, check_interval=0.1))
    assert any(e["reason"] == "Failed" and "Failed to pull image" in e["message"] for e in kube.events("nopull"))
    # a 503 on reading the pod: the provider's generic_api_retry gets through
    kube.fail_requests("GET", r"/pods/nopull$", status=503, times=1)
    assert pm.read_pod(pod).status.phase == "Pending"
    assert [r.path for r in kube.requests if r.path.endswith("/pods/nopull")][-3:] == [
        "/api/v1/namespaces/default/pods/nopull"
    ] * 3
    kube.fail_pulls("registry.example/missing:1", False)
    kube.add_image("registry.example/missing", [PY, "-c", "print('pulled at last')"])
    assert kube.wait_phase("nopull")["status"]["phase"] == "Succeeded"


def test_provider_async_hook_and_trigger(kube):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook
    from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger

    v1 = api(kube)
    code = "import time; print('hello', flush=True); time.sleep(0.8); print('bye')"
    v1.create_namespaced_pod("default", pod_body("deferred", code))

    async def drive():
        hook = AsyncKubernetesHook(conn_id="kubernetes_default")
        trigger = KubernetesPodTrigger(
            pod_name="deferred",
            pod_namespace="default",
            trigger_start_time=datetime.datetime.now(datetime.timezone.utc),
            base_container_name="base",
            kubernetes_conn_id="kubernetes_default",
            poll_interval=0.1,
            startup_check_interval=0.1,
            on_finish_action="keep_pod",
        )
        event = await asyncio.wait_for(trigger.run().__anext__(), 10)
        pod = await hook.get_pod("deferred", "default")
        logs = await hook.read_logs("deferred", "default", container_name="base")
        events = await hook.get_pod_events("deferred", "default")
        watched = [e.reason async for e in hook.watch_pod_events("deferred", "default", timeout_seconds=1)]
        await hook.delete_pod("deferred", "default")
        return event, pod, logs, events, watched

    event, pod, logs, events, watched = asyncio.run(drive())
    assert event.payload["status"] == "success", event.payload
    assert pod.status.phase == "Succeeded"
    assert [line.split(" ", 1)[1] for line in logs] == ["hello", "bye"]
    assert [e.reason for e in events.items] == ["Scheduled", "Pulled", "Created", "Started"]
    assert watched == []  # the hook stops watching once the pod is terminal
    kube.wait_for(lambda: kube.pod("deferred") is None)


def test_event_watch_and_token_never_in_pod_specs(kube):
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

    v1 = api(kube)
    v1.create_namespaced_secret("default", {"metadata": {"name": "hf"}, "stringData": {"token": "hf_NEVERinSPEC"}})
    env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]
    code = "import os, time; time.sleep(0.5); print(len(os.environ['HF_TOKEN']))"
    v1.create_namespaced_pod("default", pod_body("watched", code, env=env))

    async def watch_events():
        hook = AsyncKubernetesHook(conn_id="kubernetes_default")
        return [e.reason async for e in hook.watch_pod_events("watched", "default", timeout_seconds=1)]

    reasons = asyncio.run(watch_events())
    assert reasons[:2] == ["Scheduled", "Pulled"]
    kube.wait_phase("watched")
    assert kube.logs("watched") == "14\n"
    assert kube.pod_specs() and not any("hf_NEVERinSPEC" in b for b in kube.pod_specs())
    assert kube.where("hf_NEVERinSPEC") == ["POST /api/v1/namespaces/default/secrets"]
    v1.delete_namespaced_pod("watched", "default")
    assert kube.where("14\n") == ["log default/watched/base"]  # deleted pods' logs are kept for such checks


def test_close_leaves_nothing_running(tmp_path):
    marker = f"kube-stand-in-grandchild-{os.getpid()}-{time.time_ns()}"
    with KubeApiServer(tmp_path) as server:
        v1 = api(server)
        code = (
            "import subprocess, sys, time\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', '{marker}'])\n"
            "print('up'); time.sleep(60)\n"
        )
        v1.create_namespaced_pod("default", pod_body("sleeper", code))
        server.wait_for(lambda: server.logs("sleeper") == "up\n")
        # a follow and a watch in flight when the server goes away
        resp = v1.read_namespaced_pod_log("sleeper", "default", follow=True, _preload_content=False)
        pids = server.pids()
    assert all(not Path(f"/proc/{p}").exists() for p in pids)
    leftovers = []
    for proc in Path("/proc").iterdir():
        try:
            if marker.encode() in (proc / "cmdline").read_bytes():
                leftovers.append(proc.name)
        except OSError:
            pass
    assert leftovers == []
    assert not [t.name for t in threading.enumerate() if t.name.startswith("kube-stand-in")]
    resp.release_conn()


def test_cli_serves_a_kubeconfig(tmp_path):
    proc = subprocess.Popen(
        [PY, "-m", "tests.stand_ins.kube_api", "--port", "0", "--workdir", str(tmp_path), "--node-label", "pool=cpu"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        path = proc.stdout.readline().strip()
        v1 = client.CoreV1Api(config.new_client_from_config(path))
        assert [n.metadata.labels["pool"] for n in v1.list_node().items] == ["cpu"]
        v1.create_namespaced_pod("default", pod_body("cli", "print('from cli')", nodeSelector={"pool": "cpu"}))
        deadline = time.time() + 10
        while v1.read_namespaced_pod("cli", "default").status.phase != "Succeeded" and time.time() < deadline:
            time.sleep(0.05)
        assert log_text(v1, "cli") == "from cli\n"
        # the test hooks over HTTP
        headers = {"Authorization": f"Bearer {TOKEN}"}  # the CLI's default token
        host = v1.api_client.configuration.host
        req = urllib.request.Request(
            f"{host}/stand-in/fail-next",
            json.dumps({"pattern": "cli-*", "exit_code": 5}).encode(),
            headers,
            method="POST",
        )
        urllib.request.urlopen(req).read()
        v1.create_namespaced_pod("default", pod_body("cli-2", "print('never')", nodeSelector={"pool": "cpu"}))
        deadline = time.time() + 10
        while v1.read_namespaced_pod("cli-2", "default").status.phase != "Failed" and time.time() < deadline:
            time.sleep(0.05)
        term = v1.read_namespaced_pod("cli-2", "default").status.container_statuses[0].state.terminated
        assert term.exit_code == 5
        req = urllib.request.Request(f"{host}/stand-in/where?text=from%20cli", headers=headers)
        seen = json.loads(urllib.request.urlopen(req).read())
        assert seen == ["POST /api/v1/namespaces/default/pods", "log default/cli/base", "pod default/cli"]
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


KPO_DAG = """
import sys
from datetime import timedelta

import pendulum
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import DAG

common = dict(namespace="default", image="python:3.11", get_logs=True, on_finish_action="delete_pod",
              poll_interval=0.2, startup_check_interval_seconds=1, do_xcom_push=False)
loop = "import time\\nfor i in range(3):\\n print('{} line', i); time.sleep(0.2)"
with DAG("kpo_on_stand_in", schedule=None, start_date=pendulum.datetime(2026, 1, 1), catchup=False):
    KubernetesPodOperator(task_id="sync_pod", name="sync-pod", cmds=[sys.executable, "-u", "-c", loop.format("sync")],
                          **common)
    KubernetesPodOperator(task_id="deferred_pod", name="deferred-pod", deferrable=True,
                          cmds=[sys.executable, "-u", "-c", loop.format("deferred")], **common)
    KubernetesPodOperator(task_id="flaky", name="flaky", retries=1, retry_delay=timedelta(seconds=0),
                          cmds=[sys.executable, "-c", "print('flaky ok')"], **common)
"""

KPO_RUNNER = """
import json, os, sys
from pathlib import Path

from operators.embedded import configure, migrate

home = Path(sys.argv[1])
configure(home / "airflow", dags_folder=home / "dags")
from tests.stand_ins.fixtures import kube_env
from tests.stand_ins.kube_api import KubeApiServer

with KubeApiServer(home / "kube") as kube:
    os.environ.update(kube_env(kube.kubeconfig))
    kube.fail_next("flaky-*", times=1, exit_code=3)
    migrate()
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(home / "dags")).get_dag("kpo_on_stand_in")
    run = dag.test()
    summary = {
        "run": str(run.state),
        "tasks": {ti.task_id: [str(ti.state), ti.try_number] for ti in run.get_task_instances()},
        "changes": [[r.method, r.path, r.body] for r in kube.requests if r.method != "GET"],
        "pods_left": [p["metadata"]["name"] for p in kube.pods()],
    }
print("SUMMARY " + json.dumps(summary))
"""


def test_kubernetes_pod_operator_runs_on_the_stand_in(tmp_path):
    """The real KubernetesPodOperator in a real task run (`dag.test()`, its own Airflow home, in a child process):
    sync with streamed logs, deferrable through KubernetesPodTrigger, and a retry after a pod failure."""
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "kpo_dag.py").write_text(KPO_DAG)
    (tmp_path / "runner.py").write_text(KPO_RUNNER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CKPTFLOW_TEST", "KUBECONFIG"))}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [PY, str(tmp_path / "runner.py"), str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    summary = json.loads(text.split("SUMMARY ", 1)[1].splitlines()[0])
    assert summary["run"] == "success", text[-3000:]
    assert summary["tasks"] == {
        "sync_pod": ["success", 1],
        "deferred_pod": ["success", 1],
        "flaky": ["success", 2],
    }
    for line in ("[base] sync line 0", "[base] sync line 2", "deferred line 2", "injected failure, exit code 3"):
        assert line in text
    assert "trigger emitted an error event" not in text
    flaky = [(m, p.rsplit("/", 1)[-1], b) for m, p, b in summary["changes"] if "flaky" in p or "flaky" in b]
    assert [m for m, _, _ in flaky] == ["POST", "PATCH", "DELETE", "POST", "DELETE"]
    assert json.loads(flaky[1][2]) == {"metadata": {"labels": {"already_checked": "True"}}}
    assert summary["pods_left"] == []

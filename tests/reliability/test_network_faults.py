"""Network faults on download and publish: the real `huggingface_hub` and `google-cloud-storage` clients talk to
the stand-ins (tests/stand_ins: the hub server, the `gcp-storage-emulator`) through `FaultProxy`, which answers
HTTP 500/503/429 for a while, drops connections, cuts file bodies short or flips a byte.

Transient faults are retried with backoff and the operation completes with exactly the right bytes; faults
that outlast the retry budget end in one clear error with nothing at the destination; a corrupted file is
never accepted.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from converters.errors import CkptflowError
from converters.remote import hub as hub_lib
from converters.remote.download import download
from converters.remote.publish import publish
from tests.reliability.fault_proxy import FaultProxy
from tests.stand_ins.fixtures import TOKEN, converted, folder_files, gcs, gcs_objects, hub, model_files  # noqa: F401

SHARD = r"/resolve/[0-9a-f]{40}/model-00001-of-00002\.safetensors$"
ANY_FILE = r"/resolve/[0-9a-f]{40}/"


@pytest.fixture
def faulty_hub(hub, monkeypatch):
    """The hub stand-in behind a FaultProxy; `HF_ENDPOINT` points at the proxy. Backoff base 0.01 s."""
    with FaultProxy(hub.url) as proxy:
        monkeypatch.setenv("HF_ENDPOINT", proxy.url)
        yield hub, proxy


def _assert_downloaded(out, files, manifest):
    on_disk = folder_files(out)
    for name, meta in manifest["files"].items():
        assert on_disk[name] == files[name], name  # byte for byte what the hub holds
        assert meta["verified"] in ("sha256", "git-oid")
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no staging or temp folder left


# ----------------------------------------------------------------------------------------------- download


@pytest.mark.parametrize("fault", [500, 503, 429, "drop", "truncate"])
def test_download_rides_out_transient_faults(faulty_hub, tmp_path, fault, caplog):
    hub, proxy = faulty_hub
    files = model_files()
    hub.state.commit("acme/tiny", files)
    proxy.add("GET", SHARD, fault, times=2)
    proxy.add("GET", r"/api/models/acme/tiny", fault, times=2)
    manifest, copied = download("acme/tiny", tmp_path / "out")
    assert copied and proxy.count(fault) == 4
    _assert_downloaded(tmp_path / "out", files, manifest)
    assert any("retrying" in r.message for r in caplog.records)


def test_download_gives_up_after_the_retry_budget_with_one_clear_line(faulty_hub, tmp_path):
    hub, proxy = faulty_hub
    hub.state.commit("acme/tiny", model_files())
    proxy.add("GET", SHARD, 503, times=None)
    t0 = time.monotonic()
    with pytest.raises(CkptflowError) as e:
        download("acme/tiny", tmp_path / "out")
    msg = str(e.value)
    assert "acme/tiny" in msg and "503" in msg and "\n" not in msg, msg
    assert proxy.count(503) == hub_lib.RETRIES  # every try, then no more
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "out").exists()
    # a later run, once the hub answers again, completes
    proxy.rules.clear()
    manifest, copied = download("acme/tiny", tmp_path / "out")
    assert copied and set(manifest["files"]) >= {"model-00001-of-00002.safetensors"}


def test_a_corrupted_body_is_never_accepted(faulty_hub, tmp_path):
    """A byte flipped in transit (length unchanged, so no transport error): the sha256 check refuses the file."""
    hub, proxy = faulty_hub
    files = model_files()
    hub.state.commit("acme/tiny", files)
    proxy.add("GET", SHARD, "corrupt", times=1)
    with pytest.raises(CkptflowError, match="does not match the hub's metadata") as e:
        download("acme/tiny", tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    manifest, copied = download("acme/tiny", tmp_path / "out")  # fetched anew, right this time
    assert copied
    _assert_downloaded(tmp_path / "out", files, manifest)


def test_cli_download_through_faults(faulty_hub, tmp_path, rel):
    """The command line as the pipeline runs it: transient faults do not change the exit status or the files."""
    import subprocess

    from tests.stand_ins.fixtures import hub_env

    hub, proxy = faulty_hub
    files = model_files()
    hub.state.commit("acme/tiny", files)
    proxy.add("GET", ANY_FILE, 503, times=3)
    proxy.add("GET", ANY_FILE, "truncate", times=2)
    env = {**rel.child_env(), **hub_env(proxy.url, hub.home)}
    r = subprocess.run(
        rel.cli("download", "acme/tiny", str(tmp_path / "out"), "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads(r.stdout)
    _assert_downloaded(tmp_path / "out", files, manifest)
    assert proxy.count(503) == 3 and proxy.count("truncate") == 2


# ------------------------------------------------------------------------------------------ publish: hub


@pytest.mark.parametrize("fault", [500, 503, 429, "drop"])
def test_hub_publish_rides_out_transient_faults(faulty_hub, converted, tmp_path, monkeypatch, fault):
    hub, proxy = faulty_hub
    mt, _ = converted
    src = shutil.copytree(mt, tmp_path / "mt")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    proxy.add("POST", r"/api/repos/create", fault, times=1)
    proxy.add("POST", r"/preupload/", fault, times=1)
    proxy.add("POST", r"/commit/", fault, times=2)
    receipt = publish(src, "hf://acme/published")
    assert receipt["status"] == "published"
    assert proxy.count(fault) >= 3
    repo = hub.state.repos["acme/published"]
    commit = repo.resolve("main")
    local = folder_files(src)
    assert {k: v for k, v in commit.files.items() if k in local} == local  # every file, exactly
    ours = [c for c in repo.commits if "ckptflow-manifest.json" in c.files]
    assert len(ours) == 1  # one commit with the checkpoint: no half-published version, no duplicate


def test_hub_publish_gives_up_after_the_retry_budget_and_publishes_nothing(
    faulty_hub, converted, tmp_path, monkeypatch
):
    hub, proxy = faulty_hub
    mt, _ = converted
    src = shutil.copytree(mt, tmp_path / "mt")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    proxy.add("POST", r"/commit/", 503, times=None)
    with pytest.raises(CkptflowError) as e:
        publish(src, "hf://acme/published")
    msg = str(e.value)
    assert "acme/published" in msg and "\n" not in msg, msg
    repo = hub.state.repos.get("acme/published")  # created (with its .gitattributes commit), but nothing published
    assert repo is None or "ckptflow-manifest.json" not in repo.resolve("main").files
    proxy.rules.clear()
    assert publish(src, "hf://acme/published")["status"] == "published"  # and a retry later goes through


# ------------------------------------------------------------------------------------------ publish: GCS


@pytest.fixture
def faulty_gcs(gcs, monkeypatch):
    """The GCS emulator behind a FaultProxy; retries wait 0.01 s at first and give up after 3 s (not 1 s / 300 s)."""
    from converters.remote import gcs as gcs_lib

    monkeypatch.setattr(gcs_lib, "RETRY_INITIAL", 0.01)
    monkeypatch.setattr(gcs_lib, "RETRY_SECONDS", 3.0)
    with FaultProxy(gcs.url) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        yield gcs, proxy


DEST = "gs://ckptflow-test/models/tiny/v1"


@pytest.mark.parametrize("fault", [503, "drop"])  # 429 and 500 take the same retry path in the client (its predicate)
def test_gcs_publish_rides_out_transient_faults(faulty_gcs, converted, tmp_path, fault):
    _, proxy = faulty_gcs
    mt, _ = converted
    src = shutil.copytree(mt, tmp_path / "mt")
    proxy.add("POST", r"/upload/", fault, times=2)  # starting uploads
    proxy.add("POST", r"/rewriteTo/|/copyTo/", fault, times=1)  # server-side copy into place
    proxy.add("GET", r"/o/", fault, times=1)  # reading object metadata
    receipt = publish(src, DEST)
    assert receipt["status"] == "published"
    assert proxy.count(fault) >= 2
    remote = gcs_objects("ckptflow-test", "models/tiny/v1/")
    local = folder_files(src)
    assert {
        k.removeprefix("models/tiny/v1/"): v for k, v in remote.items() if not k.endswith("ckptflow-published.json")
    } == local
    assert not [k for k in gcs_objects("ckptflow-test") if ".ckptflow-staging-" in k]


def test_gcs_publish_gives_up_after_the_retry_budget_without_a_marker(faulty_gcs, converted, tmp_path, monkeypatch):
    from converters.remote import gcs as gcs_lib

    _, proxy = faulty_gcs
    mt, _ = converted
    src = shutil.copytree(mt, tmp_path / "mt")
    proxy.add("POST", r"/upload/", 503, times=None)
    t0 = time.monotonic()
    with pytest.raises(CkptflowError) as e:
        publish(src, DEST)
    assert "\n" not in str(e.value) and time.monotonic() - t0 < 60, str(e.value)
    assert not [k for k in gcs_objects("ckptflow-test") if k.endswith(gcs_lib.MARKER)]  # nothing reads as published

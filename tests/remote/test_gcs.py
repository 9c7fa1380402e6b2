"""Publishing to gs:// against the `gcp-storage-emulator` package on 127.0.0.1 with the real google-cloud-storage
client: staging prefix, marker written last, resume after an interruption, no silent overwrite."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from converters.errors import CkptflowError, OutputExistsError
from converters.remote import gcs as gcs_lib
from converters.remote.publish import publish
from tests.stand_ins.fixtures import converted, folder_files, gcs, gcs_objects  # noqa: F401  (fixtures)

DEST = "gs://ckptflow-test/models/tiny/v1"
FINAL = "models/tiny/v1/"


def test_publish_uploads_via_staging_and_writes_the_marker_last(gcs, converted, tmp_path, monkeypatch):
    mt, sha = converted
    src = shutil.copytree(mt, tmp_path / "mt")
    order = []
    real_upload, real_copy = gcs_lib._upload_one, gcs_lib._copy_one
    monkeypatch.setattr(
        gcs_lib, "_upload_one", lambda b, name, *a: (order.append(("upload", name)), real_upload(b, name, *a))
    )
    monkeypatch.setattr(gcs_lib, "_copy_one", lambda b, s, d: (order.append(("copy", d)), real_copy(b, s, d)))

    receipt = publish(src, DEST)
    assert receipt["status"] == "published" and receipt["destination"] == DEST
    local = folder_files(src)
    remote = gcs_objects("ckptflow-test")
    assert {k[len(FINAL) :]: v for k, v in remote.items() if k != FINAL + gcs_lib.MARKER} == local
    assert set(remote) == {FINAL + rel for rel in local} | {FINAL + gcs_lib.MARKER}  # staging removed
    uploads = [n for kind, n in order if kind == "upload"]
    assert uploads and all(
        n.startswith("models/tiny/.v1.ckptflow-staging-") for n in uploads
    )  # never at the final path
    assert order.index(("copy", FINAL + "ckptflow-manifest.json")) > max(
        i for i, (k, _) in enumerate(order) if k == "upload"
    )
    marker = json.loads(remote[FINAL + gcs_lib.MARKER])
    assert marker["version"] == receipt["output_digest"] == json.loads(local["ckptflow-manifest.json"])["output_digest"]
    assert marker["source"]["revision"] == sha and set(marker["files"]) == set(local)
    assert gcs_lib.read_marker(DEST)["version"] == marker["version"]

    assert publish(src, DEST)["status"] == "unchanged"


def test_an_interrupted_upload_leaves_nothing_at_the_final_path_and_resumes(gcs, converted, tmp_path, monkeypatch):
    mt, _ = converted
    src = shutil.copytree(mt, tmp_path / "mt")
    real_upload = gcs_lib._upload_one
    done = []

    def dies_after_three(bucket, name, *a):
        if len(done) >= 3:
            raise ConnectionError("simulated: the worker died in the middle of the upload")
        real_upload(bucket, name, *a)
        done.append(name)

    monkeypatch.setattr(gcs_lib, "WORKERS", 1)
    monkeypatch.setattr(gcs_lib, "_upload_one", dies_after_three)
    with pytest.raises(ConnectionError):
        publish(src, DEST, workers=1)
    objects = gcs_objects("ckptflow-test")
    assert not [k for k in objects if k.startswith(FINAL)]  # a reader sees nothing at all at the destination
    assert gcs_lib.read_marker(DEST) is None
    assert len([k for k in objects if ".ckptflow-staging-" in k]) == 3

    uploaded = []
    monkeypatch.setattr(gcs_lib, "_upload_one", lambda b, name, *a: (uploaded.append(name), real_upload(b, name, *a)))
    assert publish(src, DEST)["status"] == "published"
    total = len(folder_files(src))
    assert len(uploaded) == total - 3 and not set(uploaded) & set(done)  # only what was missing
    objects = gcs_objects("ckptflow-test")
    assert {k[len(FINAL) :] for k in objects} == set(folder_files(src)) | {gcs_lib.MARKER}


def small_checkpoint(root: Path, payload: bytes, extra: dict[str, bytes] | None = None) -> Path:
    """A few files with a manifest listing them (publish checks the files, not what they hold)."""
    files = {"0/items/_METADATA": b"{}", "0/items/data": payload, **(extra or {})}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    outputs = {rel: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for rel, d in files.items()}
    (root / "ckptflow-manifest.json").write_text(
        json.dumps(
            {"family": "llama3.1", "outputs": outputs, "output_digest": "sha256:" + hashlib.sha256(payload).hexdigest()}
        )
    )
    return root


def test_a_different_version_is_refused_unless_forced_and_replaced_cleanly(gcs, tmp_path):
    first = small_checkpoint(tmp_path / "a", b"one")
    second = small_checkpoint(tmp_path / "b", b"two", {"extra.txt": b"only in the second version"})
    assert publish(first, DEST)["status"] == "published"
    with pytest.raises(OutputExistsError, match="different version.*--force"):
        publish(second, DEST)
    assert gcs_objects("ckptflow-test", FINAL)[FINAL + "0/items/data"] == b"one"
    assert publish(second, DEST, force=True)["status"] == "replaced"
    assert gcs_objects("ckptflow-test", FINAL)[FINAL + "extra.txt"] == b"only in the second version"
    assert publish(first, DEST, force=True)["status"] == "replaced"
    objects = gcs_objects("ckptflow-test", FINAL)
    assert FINAL + "extra.txt" not in objects and objects[FINAL + "0/items/data"] == b"one"  # old files are gone
    assert (
        json.loads(objects[FINAL + gcs_lib.MARKER])["version"]
        == json.loads((first / "ckptflow-manifest.json").read_text())["output_digest"]
    )
    assert not [k for k in gcs_objects("ckptflow-test") if ".ckptflow-staging-" in k]


def test_foreign_objects_without_a_marker_are_not_overwritten(gcs, tmp_path):
    from google.cloud import storage

    storage.Client().bucket("ckptflow-test").blob(FINAL + "notes.txt").upload_from_string("someone else's")
    with pytest.raises(OutputExistsError, match="no complete ckptflow version"):
        publish(small_checkpoint(tmp_path / "a", b"one"), DEST)
    assert gcs_objects("ckptflow-test", FINAL) == {FINAL + "notes.txt": b"someone else's"}


@pytest.mark.parametrize(
    "uri, message",
    [
        ("gs://ckptflow-test", "name a folder"),
        ("gs://ckptflow-test/a/../b", "name a folder"),
        ("gs://UPPER/x", "not a valid bucket"),
        ("gs://no-such-bucket/x/v1", "not found"),
    ],
)
def test_bad_gs_destinations_fail_clearly(gcs, tmp_path, uri, message):
    with pytest.raises(CkptflowError, match=message):
        publish(small_checkpoint(tmp_path / "a", b"one"), uri)

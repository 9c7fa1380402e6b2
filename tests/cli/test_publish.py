"""`ckptflow publish`: atomic copy to file://, idempotent re-publish, no silent overwrite, clear refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from converters.cli.commands import publish as pub
from converters.cli.main import main
from converters.errors import CkptflowError, OutputExistsError


def make_checkpoint(root: Path, payload: bytes = b"weights") -> Path:
    """A folder shaped like a MaxText output, with a manifest listing every file (as `ckptflow convert` writes)."""
    (root / "0" / "items").mkdir(parents=True)
    (root / "0" / "items" / "_METADATA").write_text("{}")
    (root / "0" / "items" / "data").write_bytes(payload)
    outputs = {
        p.relative_to(root).as_posix(): {
            "bytes": p.stat().st_size,
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
        }
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
    (root / "ckptflow-manifest.json").write_text(
        json.dumps({"family": "llama3.1", "direction": "hf->maxtext", "outputs": outputs})
    )
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_publish_copies_everything_and_reports_a_digest(tmp_path):
    src = make_checkpoint(tmp_path / "ckpt")
    dest = tmp_path / "models" / "tiny" / "v1"
    receipt = pub.publish(src, dest.as_uri())
    assert receipt["status"] == "published" and receipt["files"] == 3
    assert receipt["destination"] == dest.as_uri()
    assert tree(dest) == tree(src)
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_publishing_the_same_content_again_is_a_no_op(tmp_path):
    src = make_checkpoint(tmp_path / "ckpt")
    dest = (tmp_path / "v1").as_uri()
    first = pub.publish(src, dest)
    again = pub.publish(src, dest)
    assert again["status"] == "unchanged" and again["digest"] == first["digest"]


def test_a_different_version_is_refused_unless_forced(tmp_path):
    dest = tmp_path / "v1"
    pub.publish(make_checkpoint(tmp_path / "a", b"one"), dest.as_uri())
    other = make_checkpoint(tmp_path / "b", b"two")
    with pytest.raises(OutputExistsError, match="different version.*--force"):
        pub.publish(other, dest.as_uri())
    assert (dest / "0" / "items" / "data").read_bytes() == b"one"
    receipt = pub.publish(other, dest.as_uri(), force=True)
    assert receipt["status"] == "replaced"
    assert (dest / "0" / "items" / "data").read_bytes() == b"two"


@pytest.mark.parametrize(
    "dest, message",
    [
        ("gs://bucket", "name a folder in the bucket"),
        ("hf://facebook", "not a Hugging Face repo id"),
        ("hf://a/b/c", "not a Hugging Face repo id"),
        ("s3://bucket/x", "unsupported destination scheme 's3'"),
        ("file://relative/path", "absolute path"),
    ],
)
def test_unsupported_destinations_fail_clearly(tmp_path, dest, message):
    with pytest.raises(CkptflowError, match=message):
        pub.publish(make_checkpoint(tmp_path / "ckpt"), dest)


def test_overlapping_or_missing_source_is_refused(tmp_path):
    src = make_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CkptflowError, match="overlap"):
        pub.publish(src, (src / "inside").as_uri())
    with pytest.raises(CkptflowError, match="no such folder"):
        pub.publish(tmp_path / "missing", (tmp_path / "x").as_uri())


def test_cli_writes_the_receipt_and_uses_exit_status_2_for_refusals(tmp_path, capsys):
    src = make_checkpoint(tmp_path / "ckpt")
    receipt = tmp_path / "run" / "publish.json"
    dest = (tmp_path / "v1").as_uri()
    assert main(["publish", str(src), dest, "--receipt", str(receipt), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(receipt.read_text()) == printed and printed["status"] == "published"
    assert main(["publish", str(make_checkpoint(tmp_path / "other", b"x")), dest]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["publish", str(src), "s3://b/x"]) == 2
    assert "unsupported destination scheme" in capsys.readouterr().err


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "0" / "items" / "data").write_bytes(b"weightz"), "data: sha256 differs"),
        (lambda d: (d / "0" / "items" / "data").write_bytes(b"more weights"), "data: 12 bytes, the manifest says 7"),
        (lambda d: (d / "0" / "items" / "data").unlink(), "data: missing"),
        (lambda d: (d / "stray.txt").write_text("x"), "stray.txt: not in the manifest"),
        (lambda d: (d / "ckptflow-manifest.json").unlink(), "no ckptflow-manifest.json"),
    ],
)
def test_an_output_that_no_longer_matches_its_manifest_is_refused(tmp_path, damage, message):
    src = make_checkpoint(tmp_path / "ckpt")
    damage(src)
    with pytest.raises(CkptflowError, match=message):
        pub.publish(src, (tmp_path / "v1").as_uri())
    assert not (tmp_path / "v1").exists()


def test_a_rerun_of_the_same_conversion_is_unchanged_though_its_bytes_differ(tmp_path):
    """Orbax files differ between runs; the manifest's tensor-level output_digest does not."""
    a = make_checkpoint(tmp_path / "a", b"run one bytes")
    b = make_checkpoint(tmp_path / "b", b"run two bytes")
    for d in (a, b):
        m = json.loads((d / "ckptflow-manifest.json").read_text())
        (d / "ckptflow-manifest.json").write_text(json.dumps({**m, "output_digest": "sha256:" + "a" * 64}))
    dest = (tmp_path / "v1").as_uri()
    assert pub.publish(a, dest)["status"] == "published"
    assert pub.publish(b, dest)["status"] == "unchanged"


def test_the_verify_report_is_recorded_in_the_published_manifest(tmp_path):
    src = make_checkpoint(tmp_path / "ckpt")
    report = tmp_path / "verify.json"
    report.write_text(json.dumps({"max_kl": 0.015, "dtype": "float32", "summary": {"passed": True, "kl_max": 2e-7}}))
    receipt = pub.publish(src, (tmp_path / "v1").as_uri(), verify_report=report)
    published = json.loads((tmp_path / "v1" / "ckptflow-manifest.json").read_text())
    assert published["verify"] == {"passed": True, "kl_max": 2e-7, "max_kl_threshold": 0.015, "dtype": "float32"}
    assert receipt["status"] == "published"

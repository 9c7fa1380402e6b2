"""The lineage manifest: the BLAKE3 of every file written, and checking a folder against it."""

from __future__ import annotations

import os

from blake3 import blake3

from converters.outputs.manifest import check_outputs, write_manifest


def test_manifest_records_blake3_of_every_file_and_check_outputs_finds_a_changed_byte(tmp_path):
    (tmp_path / "sub").mkdir()
    files = {"config.json": b"{}", "sub/data": os.urandom(3 << 20)}
    for rel, data in files.items():
        (tmp_path / rel).write_bytes(data)
    m = write_manifest(tmp_path, direction="hf->maxtext", family="llama3.1", options={}, source={})
    assert m["outputs"] == {rel: {"bytes": len(d), "blake3": blake3(d).hexdigest()} for rel, d in files.items()}
    assert check_outputs(tmp_path) == []
    changed = bytearray(files["sub/data"])
    changed[12345] ^= 1
    (tmp_path / "sub/data").write_bytes(changed)
    assert check_outputs(tmp_path) == ["sub/data: blake3 differs from the manifest"]


def test_check_outputs_still_reads_manifests_with_sha256(tmp_path):
    """Manifests written before BLAKE3 list each file's sha256: they are checked by it."""
    import hashlib

    (tmp_path / "w").write_bytes(b"weights")
    legacy = {"outputs": {"w": {"bytes": 7, "sha256": hashlib.sha256(b"weights").hexdigest()}}}
    assert check_outputs(tmp_path, legacy) == []
    (tmp_path / "w").write_bytes(b"weightz")
    assert check_outputs(tmp_path, legacy) == ["w: sha256 differs from the manifest"]

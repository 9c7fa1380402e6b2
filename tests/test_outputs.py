"""Files another writer finishes are hashed while it writes others, then their pages are let go."""

from __future__ import annotations

import hashlib
import os
import time

from converters import direct_io, outputs


def wait_for(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_file_hasher_hashes_settled_files_and_evicts_them(tmp_path, monkeypatch):
    evicted = []
    real = direct_io.evict
    monkeypatch.setattr(direct_io, "evict", lambda target, *a: evicted.append(os.path.basename(target)) or real(target, *a))
    (tmp_path / "d").mkdir()
    done = tmp_path / "d" / "done.bin"
    done.write_bytes(b"a" * 100000)
    with outputs.FileHasher(tmp_path, settle=0.1) as hasher:
        assert wait_for(lambda: "done.bin" in evicted)
        growing = tmp_path / "growing.bin"
        with open(growing, "wb") as f:
            for _ in range(8):  # keeps changing: if taken meanwhile, its digest is not trusted
                f.write(b"b" * 1000)
                f.flush()
                time.sleep(0.03)
        os.rename(done, tmp_path / "d" / "renamed.bin")  # Orbax renames its folders: the digest follows the inode
        known = hasher.known(tmp_path)
    assert known["d/renamed.bin"] == hashlib.sha256(b"a" * 100000).hexdigest()
    assert known.get("growing.bin") in (None, hashlib.sha256(b"b" * 8000).hexdigest())  # never a stale digest


def test_a_file_changed_after_hashing_is_not_trusted(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 5000)
    with outputs.FileHasher(tmp_path, settle=0.05) as hasher:
        assert wait_for(lambda: hasher.known(tmp_path))
    p.write_bytes(b"y" * 5000)
    assert hasher.known(tmp_path) == {}

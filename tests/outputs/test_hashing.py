"""Files another writer finishes are hashed while it writes others, then their pages are let go."""

from __future__ import annotations

import os
import time

import pytest
from blake3 import blake3

from converters.io import direct_io
from converters.outputs import hashing


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

    def spy(target, *a):
        path = os.readlink(f"/proc/self/fd/{target}") if isinstance(target, int) else os.fspath(target)
        evicted.append(os.path.basename(path))
        return real(target, *a)

    monkeypatch.setattr(direct_io, "evict", spy)
    (tmp_path / "d").mkdir()
    done = tmp_path / "d" / "done.bin"
    done.write_bytes(b"a" * 100000)
    with hashing.FileHasher(tmp_path, settle=0.1) as hasher:
        assert wait_for(lambda: "done.bin" in evicted)
        growing = tmp_path / "growing.bin"
        with open(growing, "wb") as f:
            for _ in range(8):  # keeps changing: if taken meanwhile, its digest is not trusted
                f.write(b"b" * 1000)
                f.flush()
                time.sleep(0.03)
        os.rename(done, tmp_path / "d" / "renamed.bin")  # Orbax renames its folders: the digest follows the inode
        known = hasher.known(tmp_path)
    assert known["d/renamed.bin"] == blake3(b"a" * 100000).hexdigest()
    assert known.get("growing.bin") in (None, blake3(b"b" * 8000).hexdigest())  # never a stale digest


def test_a_file_changed_after_hashing_is_not_trusted(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * 5000)
    with hashing.FileHasher(tmp_path, settle=0.05) as hasher:
        assert wait_for(lambda: hasher.known(tmp_path))
    p.write_bytes(b"y" * 5000)
    assert hasher.known(tmp_path) == {}


def test_a_file_hashed_before_its_writer_synced_it_still_leaves_the_page_cache(tmp_path):
    """`POSIX_FADV_DONTNEED` skips dirty pages: the hasher syncs a file before letting its pages go, or a file
    hashed early (before tensorstore's own fsync) would stay cached for good, and the cache would fill."""
    p = tmp_path / "dirty.bin"
    with open(p, "wb") as f:
        f.write(os.urandom(8 << 20))  # no fsync: dirty pages
    fd = os.open(p, os.O_RDONLY)
    try:
        if not direct_io._cached(fd, 0):
            pytest.skip("no RWF_NOWAIT page-cache probe here")
        with hashing.FileHasher(tmp_path, settle=0.0) as hasher:
            assert wait_for(lambda: hasher.known(tmp_path))
        probe = tmp_path / "probe.bin"  # does this filesystem drop clean pages on DONTNEED at all? (tmpfs: no)
        probe.write_bytes(b"z" * (1 << 20))
        os.sync()
        direct_io.evict(probe)
        pfd = os.open(probe, os.O_RDONLY)
        try:
            if direct_io._cached(pfd, 0):
                pytest.skip("this filesystem keeps pages on POSIX_FADV_DONTNEED")
        finally:
            os.close(pfd)
        assert not any(direct_io._cached(fd, off) for off in range(0, 8 << 20, 1 << 20))
    finally:
        os.close(fd)


def test_a_failing_file_hasher_warns_and_the_manifest_hashes_instead(tmp_path, monkeypatch, caplog):
    """An unexpected error in the background hasher (a stray thread exception would pass unseen) is logged once;
    the conversion is unaffected: `known()` is empty and the manifest hashes the files itself."""
    (tmp_path / "f.bin").write_bytes(b"x" * 5000)
    monkeypatch.setattr(hashing, "file_blake3", lambda p: (_ for _ in ()).throw(TypeError("no buffer")))
    with caplog.at_level("WARNING", logger="ckptflow.outputs"):
        with hashing.FileHasher(tmp_path, settle=0.0) as hasher:
            assert wait_for(lambda: not hasher._t.is_alive())
    assert hasher.known(tmp_path) == {}
    assert [r.getMessage() for r in caplog.records] == [
        "background file hashing stopped (TypeError: no buffer); the manifest hashes the remaining files itself, and "
        "written files stay in the page cache"
    ]

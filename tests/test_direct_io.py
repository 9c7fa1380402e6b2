"""Source reads bypass the page cache where they can, and give the same bytes either way."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from converters import direct_io
from converters.errors import CorruptFileError


@pytest.fixture
def blob(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=(3 << 20) + 12345, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    with open(path, "wb") as f:
        f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    direct_io.evict(path)  # written back, then dropped: not cached, so the O_DIRECT path is taken
    return path, data


@pytest.fixture
def spy(monkeypatch):
    """Which reads went through O_DIRECT."""
    calls = []
    real = direct_io._read_direct

    def wrapped(path, offset, nbytes):
        out = real(path, offset, nbytes)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(direct_io, "_read_direct", wrapped)
    monkeypatch.setattr(direct_io, "_no_direct", set())
    return calls


@pytest.mark.parametrize("offset,nbytes", [(0, 1 << 20), (4095, (2 << 20) + 3), (12345, 3 << 20), ((3 << 20) + 12345 - (1 << 20), 1 << 20)])
def test_direct_reads_at_any_offset_equal_the_file(blob, spy, offset, nbytes):
    path, data = blob
    got = direct_io.read_range(path, offset, nbytes)
    assert got.nbytes == nbytes and np.array_equal(got, data[offset : offset + nbytes])
    if direct_io._O_DIRECT:
        assert spy == [True]


def test_small_and_cached_reads_go_through_the_page_cache(blob, spy):
    path, data = blob
    assert np.array_equal(direct_io.read_range(path, 10, 100), data[10:110])
    assert spy == []  # below MIN_DIRECT: not even tried
    with open(path, "rb") as f:
        f.read()  # now cached
    assert np.array_equal(direct_io.read_range(path, 0, 2 << 20), data[: 2 << 20])
    assert spy == [False]


def test_filesystems_without_o_direct_fall_back(blob, spy, monkeypatch):
    path, data = blob
    real = direct_io.fcntl.fcntl

    def no_direct(fd, cmd, arg=0):
        if cmd == direct_io.fcntl.F_SETFL and arg & direct_io._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    monkeypatch.setattr(direct_io.fcntl, "fcntl", no_direct)
    for _ in range(2):
        assert np.array_equal(direct_io.read_range(path, 7, 2 << 20), data[7 : 7 + (2 << 20)])
    if direct_io._O_DIRECT:
        assert spy == [False, False] and str(path) in direct_io._no_direct


@pytest.mark.parametrize("nbytes", [1 << 20, 100])
def test_reading_past_the_end_is_a_corrupt_file(blob, nbytes):
    path, data = blob
    with pytest.raises(CorruptFileError, match="unexpected end of file"):
        direct_io.read_range(path, data.nbytes - 10, nbytes)


def test_evict_is_only_a_hint(tmp_path):
    direct_io.evict(tmp_path / "missing")  # no error
    p = tmp_path / "f"
    p.write_bytes(b"x" * 10000)
    with open(p, "rb") as f:
        direct_io.evict(f.fileno(), 0, 4096)
    assert p.read_bytes() == b"x" * 10000

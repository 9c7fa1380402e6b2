"""Source reads bypass the page cache where they can, and give the same bytes either way."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from converters.errors import CorruptFileError
from converters.io import direct_io


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


@pytest.mark.parametrize(
    "offset,nbytes", [(0, 1 << 20), (4095, (2 << 20) + 3), (12345, 3 << 20), ((3 << 20) + 12345 - (1 << 20), 1 << 20)]
)
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


SIZES = [0, 1, 4095, 4096, 65535, 65536, 65537, 3 * 65536 + 123]


@pytest.fixture
def small_stage(monkeypatch):
    monkeypatch.setattr(direct_io.SequentialWriter, "STAGE", 64 << 10)


@pytest.mark.parametrize("size", SIZES)
def test_sequential_writer_writes_exactly_the_bytes_given(tmp_path, small_stage, size):
    data = np.random.default_rng(size).integers(0, 256, size=size, dtype=np.uint8)
    w = direct_io.SequentialWriter(tmp_path / "f")
    assert w.direct == bool(direct_io._O_DIRECT)  # ext4 under /tmp takes O_DIRECT
    rng = np.random.default_rng(0)
    at = 0
    while at < size:  # pieces of every size, unaligned
        n = int(rng.integers(1, 40000))
        w.write(memoryview(data[at : at + n]))
        at += n
    w.close()
    assert (tmp_path / "f").read_bytes() == data.tobytes() and w.size == size


def test_sequential_writer_without_o_direct_writes_plainly_and_evicts_behind(tmp_path, monkeypatch):
    real = direct_io.fcntl.fcntl

    def no_direct(fd, cmd, arg=0):
        if cmd == direct_io.fcntl.F_SETFL and arg & direct_io._O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, cmd, arg)

    evicted = []
    monkeypatch.setattr(direct_io.fcntl, "fcntl", no_direct)
    monkeypatch.setattr(direct_io.SequentialWriter, "EVICT_LAG", 1 << 16)
    monkeypatch.setattr(direct_io, "evict", lambda target, offset=0, nbytes=0: evicted.append(nbytes))
    data = np.random.default_rng(3).integers(0, 256, size=1 << 20, dtype=np.uint8)
    w = direct_io.SequentialWriter(tmp_path / "f")
    assert not w.direct
    for at in range(0, data.size, 50000):
        w.write(memoryview(data[at : at + 50000]))
    w.close()
    assert (tmp_path / "f").read_bytes() == data.tobytes()
    assert len(evicted) >= 3 and evicted == sorted(evicted)


def test_a_failed_direct_write_is_raised_to_the_writer(tmp_path, small_stage, monkeypatch):
    if not direct_io._O_DIRECT:
        pytest.skip("no O_DIRECT here")

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.os, "pwrite", full)
    w = direct_io.SequentialWriter(tmp_path / "f")
    with pytest.raises(OSError) as e:
        for _ in range(8):
            w.write(memoryview(bytes(40000)))
        w.close()
    assert e.value.errno == errno.ENOSPC
    w.abort()  # after a failure: no hang, no second error


@pytest.mark.parametrize(
    "offset,nbytes", [(0, None), (0, 1 << 20), (12345, 2 << 20), (5, 3), ((3 << 20) + 12000, None)]
)
def test_read_blocks_gives_the_range_asked_for_in_blocks_of_at_most_chunk(blob, offset, nbytes):
    path, data = blob
    blocks = [bytes(b) for b in direct_io.read_blocks(path, 64 << 10, offset, nbytes)]
    want = data[offset:] if nbytes is None else data[offset : offset + nbytes]
    assert b"".join(blocks) == want.tobytes() and all(len(b) <= 64 << 10 for b in blocks)


def test_read_blocks_ends_where_the_file_does(blob):
    path, data = blob
    assert (
        b"".join(bytes(b) for b in direct_io.read_blocks(path, 1 << 20, len(data) - 10, 1000)) == data[-10:].tobytes()
    )

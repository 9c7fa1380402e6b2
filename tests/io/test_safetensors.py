from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from converters.errors import CkptflowError, CorruptFileError
from converters.io.safetensors import (
    PlannedTensor,
    SafetensorsFile,
    SafetensorsFolder,
    ShardWriter,
    read_tensor,
    save_file,
)


def test_reads_what_the_reference_library_writes(tmp_path):
    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.ones((2, 5), ml_dtypes.bfloat16),
        "c": np.array([1, 2], np.int64),
    }
    safetensors.numpy.save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    f = SafetensorsFolder(tmp_path)
    for n, t in tensors.items():
        assert np.array_equal(f.read(n), t) and f.read(n).dtype == t.dtype
    assert np.array_equal(f.read("a", slice(1, 3)), tensors["a"][1:3])


def test_reference_library_reads_what_we_write(tmp_path):
    tensors = {
        "w": np.arange(20, dtype=np.float32).reshape(4, 5).astype(ml_dtypes.bfloat16),
        "z": np.zeros((0, 3), np.float32),
    }
    save_file(tmp_path / "m.safetensors", tensors)
    back = safetensors.numpy.load_file(tmp_path / "m.safetensors")
    assert all(np.array_equal(back[n], t) for n, t in tensors.items())


def test_writer_accepts_row_chunks_and_checks_order(tmp_path):
    w = ShardWriter(tmp_path / "m.safetensors", [PlannedTensor("a", (4, 2), np.dtype(np.float32))])
    with pytest.raises(RuntimeError, match="expected tensor 'a'"):
        w.write("b", np.zeros((4, 2), np.float32))
    w.write("a", np.ones((1, 2), np.float32))
    w.write("a", np.full((3, 2), 2, np.float32))
    w.close()
    assert read_tensor(SafetensorsFile(tmp_path / "m.safetensors").tensors["a"]).tolist() == [
        [1, 1],
        [2, 2],
        [2, 2],
        [2, 2],
    ]


def _raw(tmp_path, header: bytes, body: bytes = b"", hlen: int | None = None):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(header) if hlen is None else hlen) + header + body)
    return p


@pytest.mark.parametrize(
    "header,body,hlen,match",
    [
        (b"", b"", None, "not valid JSON"),
        (b"{", b"", None, "not valid JSON"),
        (b"[]", b"", None, "not a JSON object"),
        (b"{}", b"", 10**12, "exceeds"),
        (b"{}", b"", 50, "runs past the end"),
        (
            json.dumps({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}).encode(),
            b"\0" * 4,
            None,
            "unknown dtype",
        ),
        (
            json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode(),
            b"\0" * 4,
            None,
            "needs 8 bytes",
        ),
        (
            json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(),
            b"\0" * 4,
            None,
            "truncated",
        ),
        (
            json.dumps({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode(),
            b"\0" * 4,
            None,
            "invalid shape",
        ),
        (
            json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}).encode(),
            b"\0" * 4,
            None,
            "invalid data_offsets",
        ),
        (
            json.dumps(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
                }
            ).encode(),
            b"\0" * 8,
            None,
            "overlap",
        ),
    ],
)
def test_corrupt_headers_fail_with_the_cause(tmp_path, header, body, hlen, match):
    p = _raw(tmp_path, header, body, hlen)
    with pytest.raises(CorruptFileError, match=match) as e:
        SafetensorsFile(p)
    assert str(p) in str(e.value)


def test_truncated_file(tmp_path):
    save_file(tmp_path / "m.safetensors", {"w": np.ones((64, 64), np.float32)})
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="truncated"):
        SafetensorsFolder(tmp_path)
    (tmp_path / "m.safetensors").write_bytes(data[:5])
    with pytest.raises(CorruptFileError, match="shorter than the 8-byte"):
        SafetensorsFolder(tmp_path)


def test_pickle_only_folder_is_refused_with_explanation(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CkptflowError, match="never unpickles"):
        SafetensorsFolder(tmp_path)


def test_index_must_match_files(tmp_path):
    save_file(tmp_path / "a.safetensors", {"x": np.ones(2, np.float32)})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})
    )
    with pytest.raises(CkptflowError, match="missing: b.safetensors"):
        SafetensorsFolder(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../a.safetensors"}}))
    with pytest.raises(CorruptFileError, match="not a plain file name"):
        SafetensorsFolder(tmp_path)


def test_shard_writer_output_and_digests_are_whole_across_many_direct_writes(tmp_path, monkeypatch):
    """Staged in small blocks (so many O_DIRECT writes and a padded, truncated tail), the file is exactly the
    safetensors bytes, and its BLAKE3 and each tensor's match."""
    from blake3 import blake3

    from converters.io import direct_io

    monkeypatch.setattr(direct_io.SequentialWriter, "STAGE", 64 << 10)
    rng = np.random.default_rng(1)
    tensors = {
        f"t{k}": rng.integers(0, 2**15, size=(97 + k, 1031), dtype=np.int16).view(ml_dtypes.bfloat16) for k in range(6)
    }
    w = ShardWriter(tmp_path / "s.safetensors", [PlannedTensor(n, t.shape, t.dtype) for n, t in tensors.items()])
    for n, t in tensors.items():
        for rows in (slice(0, 50), slice(50, t.shape[0])):
            w.write(n, t[rows])
    w.close()
    raw = (tmp_path / "s.safetensors").read_bytes()
    assert w.digest == blake3(raw).hexdigest()
    assert w.tensor_digests == {n: blake3(t.tobytes()).hexdigest() for n, t in tensors.items()}
    back = safetensors.numpy.load_file(tmp_path / "s.safetensors")
    assert all(np.array_equal(back[n].view(np.int16), t.view(np.int16)) for n, t in tensors.items())

"""Fuzzing the safetensors reader (`converters.io.safetensors`): every input ends in our own clear error or a
correct read, never a crash, a hang or an unbounded allocation.

Cases start from a valid file (random tensors, dtypes, shapes, metadata) and apply 0-3 mutations: truncation,
wrong or huge header lengths, a header longer than the file, offsets out of range, reversed or overlapping,
unknown or wrong dtypes, shapes that do not match byte sizes (or overflow), arbitrary JSON in every field,
deep nesting, non-UTF-8 bytes, bit flips. A second fuzz feeds raw bytes, a third the shard index.

Properties: `SafetensorsFile(path)` raises `CkptflowError` (one line, naming the file) or returns; when it
returns, every tensor (and a row range of it) reads back with its declared dtype and shape, and an unmutated
file reads exactly what the reference `safetensors` library reads.

Case counts: `CKPTFLOW_FUZZ_EXAMPLES` (default 2000) structured cases, half that of raw bytes, a quarter of
index cases; derandomized (the same cases every run) unless `CKPTFLOW_FUZZ_RANDOM=1`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters.errors import CkptflowError
from converters.io.safetensors import (
    DTYPES,
    INDEX_NAME,
    MAX_HEADER_BYTES,
    SafetensorsFile,
    SafetensorsFolder,
    read_tensor,
)

EXAMPLES = int(os.environ.get("CKPTFLOW_FUZZ_EXAMPLES", "2000"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=os.environ.get("CKPTFLOW_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
BAD_TAGS = ["Q9", "F4", "", "f32", "F32 ", "U128", "C64", "bf16", "F8_E4M3FNUZ"]
U64 = 2**64 - 1

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)
json_values = st.recursive(
    json_scalars,
    lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=5), ch, max_size=4),
    max_leaves=10,
)
dims = st.integers(0, 5)
odd_dims = st.one_of(st.integers(-3, 8), st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64, 10**30]))


# F4 packs two values per byte (shapes count values, not bytes): tests/io/test_deepseek4_source.py reads it
VALUE_DTYPES = sorted(t for t in DTYPES if t != "F4")


@st.composite
def valid_file(draw):
    """(header dict, data bytes) of a valid file: contiguous tensors in order."""
    n = draw(st.integers(0, 4))
    names = draw(
        st.lists(
            st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"), min_size=n, max_size=n, unique=True
        )
    )
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    data = b""
    for name in names:
        tag = draw(st.sampled_from(VALUE_DTYPES))
        shape = draw(st.lists(dims, max_size=3))
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[tag].itemsize
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [len(data), len(data) + nbytes]}
        data += draw(st.binary(min_size=nbytes, max_size=nbytes))
    return header, data


def tensor_names(header: dict) -> list[str]:
    return [k for k in header if k != "__metadata__"]


@st.composite
def header_mutation(draw, header: dict, data_len: int):
    """Change one field of one tensor entry (or the entry, or the metadata) in place."""
    names = tensor_names(header)
    what = draw(st.sampled_from(["dtype", "shape", "offsets", "entry", "metadata", "overlap", "extra_key"]))
    if what == "metadata":
        header["__metadata__"] = draw(json_values)
        return "metadata"
    if not names:
        header[draw(st.text(max_size=4))] = draw(json_values)
        return "new entry"
    name = draw(st.sampled_from(names))
    entry = header[name]
    if not isinstance(entry, dict):
        header[name] = draw(json_values)
        return "entry"
    if what == "dtype":
        entry["dtype"] = draw(st.sampled_from(BAD_TAGS + sorted(DTYPES)) | json_values)
    elif what == "shape":
        entry["shape"] = draw(st.lists(odd_dims, max_size=4) | json_values)
    elif what == "offsets":
        lim = data_len + 16
        entry["data_offsets"] = draw(
            st.lists(st.integers(-4, lim) | st.sampled_from([2**63, U64, 10**30]), min_size=0, max_size=3) | json_values
        )
    elif what == "overlap" and len(names) > 1:
        other = header[draw(st.sampled_from([n for n in names if n != name]))]
        if isinstance(other, dict):
            entry["data_offsets"] = other.get("data_offsets")
    elif what == "extra_key":
        entry[draw(st.text(max_size=5))] = draw(json_values)
    else:
        header[name] = draw(json_values)
    return what


def serialize(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@st.composite
def byte_mutation(draw, blob: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "hlen", "flip", "insert", "append", "deep", "not_utf8"]))
    hlen = struct.unpack("<Q", blob[:8])[0] if len(blob) >= 8 else 0
    if kind == "truncate":
        return blob[: draw(st.integers(0, max(0, len(blob) - 1)))]
    if kind == "hlen":
        new = draw(
            st.sampled_from(
                [
                    0,
                    1,
                    hlen - 1,
                    hlen + 1,
                    hlen + 8,
                    len(blob),
                    len(blob) - 7,
                    MAX_HEADER_BYTES,
                    MAX_HEADER_BYTES + 1,
                    2**32,
                    2**63,
                    U64,
                ]
            )
            | st.integers(0, U64)
        )
        return struct.pack("<Q", max(0, min(U64, new))) + blob[8:]
    if kind == "flip" and blob:
        i = draw(st.integers(0, len(blob) - 1))
        return blob[:i] + bytes([blob[i] ^ (1 << draw(st.integers(0, 7)))]) + blob[i + 1 :]
    if kind == "insert":
        i = draw(st.integers(0, len(blob)))
        return blob[:i] + draw(st.binary(min_size=1, max_size=16)) + blob[i:]
    if kind == "append":
        return blob + draw(st.binary(max_size=64))
    if kind == "deep":  # nesting deep enough to exhaust a recursive JSON parser
        depth = draw(st.sampled_from([100, 10_000, 200_000]))
        raw = (
            ("[" * depth + "]" * depth).encode()
            if draw(st.booleans())
            else ('{"a":' * depth + "1" + "}" * depth).encode()
        )
        return struct.pack("<Q", len(raw)) + raw
    if kind == "not_utf8":
        raw = b'{"\xff\xfe": 1}'
        return struct.pack("<Q", len(raw)) + raw
    return blob


def check(path: Path) -> str:
    """Parse and read everything; returns 'ok' or 'refused'. Anything but CkptflowError propagates (a failure)."""
    try:
        f = SafetensorsFile(path)
    except CkptflowError as e:
        msg = str(e)
        assert str(path) in msg and "\n" not in msg, msg
        return "refused"
    size = path.stat().st_size
    assert sum(t.nbytes for t in f.tensors.values()) <= size
    for info in f.tensors.values():
        a = read_tensor(info)
        assert a.dtype == info.dtype and a.shape == info.shape and a.nbytes == info.nbytes
        if info.shape and info.shape[0] > 1:
            part = read_tensor(info, slice(1, info.shape[0]))
            assert part.tobytes() == a[1:].tobytes()
    return "ok"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "x.safetensors"


OUTCOMES: dict[str, dict[str, int]] = {}


def _count(test: str, outcome: str) -> None:
    OUTCOMES.setdefault(test, {}).setdefault(outcome, 0)
    OUTCOMES[test][outcome] += 1


@FUZZ
@given(st.data())
def test_structured_mutations(scratch, data):
    header, body = data.draw(valid_file())
    mutations = []
    for _ in range(data.draw(st.integers(0, 3))):
        if data.draw(st.booleans()):
            mutations.append(data.draw(header_mutation(header, len(body))))
    blob = serialize(header, body)
    for _ in range(data.draw(st.integers(0, 1 if mutations else 2))):
        blob = data.draw(byte_mutation(blob))
        mutations.append("bytes")
    scratch.write_bytes(blob)
    outcome = check(scratch)
    _count("structured", outcome)
    if not mutations:  # a valid file: we read exactly what the reference implementation reads
        assert outcome == "ok"
        import safetensors.numpy

        if any(header[n]["dtype"] in ("BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0") for n in tensor_names(header)):
            return  # safetensors.numpy cannot represent these (plain numpy has no such dtypes)

        ref = safetensors.numpy.load_file(scratch)
        f = SafetensorsFile(scratch)
        assert sorted(ref) == sorted(f.tensors)
        for name, arr in ref.items():
            assert read_tensor(f.tensors[name]).tobytes() == arr.tobytes()


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(
    st.binary(max_size=256)
    | st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, U64), st.binary(max_size=128))
)
def test_raw_bytes(scratch, blob):
    scratch.write_bytes(blob)
    _count("raw", check(scratch))


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory) -> Path:
    from converters.io.safetensors import save_file

    folder = tmp_path_factory.mktemp("fuzz-index")
    save_file(folder / "a.safetensors", {"x": np.ones(2, np.float32)})
    return folder


SHARD_NAMES = ["a.safetensors", "../a.safetensors", "/etc/passwd", "sub/a.safetensors", ".hidden", "b.safetensors"]


@settings(FUZZ, max_examples=max(1, EXAMPLES // 4))
@given(
    index=json_values
    | st.builds(
        lambda wm: {"weight_map": wm},
        st.dictionaries(st.text(max_size=4) | st.just("x"), json_values | st.sampled_from(SHARD_NAMES), max_size=3),
    )
)
def test_index_files(index_folder, index):
    (index_folder / INDEX_NAME).write_text(json.dumps(index))
    try:
        SafetensorsFolder(index_folder)
        _count("index", "ok")
    except CkptflowError as e:
        assert "\n" not in str(e)
        _count("index", "refused")


def test_zz_report_outcomes():
    """Not a check: prints how many fuzz cases were accepted and refused (for docs/reliability.md)."""
    print(json.dumps(OUTCOMES, sort_keys=True))

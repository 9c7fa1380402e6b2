"""Safetensors reading and writing, one tensor (or row range) at a time.

We parse the header ourselves instead of using `safe_open` so that every malformed file ends in a
`CorruptFileError` naming the file and the cause, and so that row ranges of huge tensors (embeddings,
lm_head) can be read without materialising the whole tensor. Nothing here can execute code from a file.
"""

from __future__ import annotations

import json
import math
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import ml_dtypes
import numpy as np

from converters.errors import CkptflowError, CorruptFileError, MappingError, UnsupportedModelError
from converters.io import direct_io
from converters.outputs.hashing import content_hasher

# safetensors dtype tag -> numpy dtype
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),  # unsigned power-of-two scales, 2^(byte - 127); 0xFF is NaN
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# Packed FP4 (E2M1), two values per byte, the first in the low nibble (`torch.float4_e2m1fn_x2`): the header's shape
# counts values, ours counts bytes (the last axis halved), so that row ranges and byte sizes work as for the others.
FP4X2 = np.dtype([("e2m1x2", np.uint8)])
DTYPES["F4"] = FP4X2
TAGS: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
# tags of the format that ckptflow does not read: named in the error instead of "unknown"
UNREAD_TAGS = ("F8_E4M3FNUZ", "F8_E5M2FNUZ", "F6_E2M3", "F6_E3M2", "C64")

# A header is JSON describing tensors; 100 MB is the limit the reference implementation enforces too.
MAX_HEADER_BYTES = 100_000_000
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int
    path: Path

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


class SafetensorsFile:
    """One .safetensors file: validated header, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._parse()

    def _fail(self, why: str) -> CorruptFileError:
        return CorruptFileError(f"{self.path}: not a valid safetensors file: {why}")

    def _parse(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._fail(f"file is {size} bytes, shorter than the 8-byte header length")
                (hlen,) = struct.unpack("<Q", head)
                if hlen > MAX_HEADER_BYTES:
                    raise self._fail(f"header length {hlen} exceeds the {MAX_HEADER_BYTES}-byte limit")
                if 8 + hlen > size:
                    raise self._fail(f"header length {hlen} runs past the end of the {size}-byte file (truncated?)")
                raw = f.read(hlen)
        except OSError as e:
            raise CkptflowError(f"{self.path}: cannot read: {e.strerror}") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"header is not valid JSON ({e})") from None
        except RecursionError:  # Python's JSON parser recurses per nesting level
            raise self._fail("header JSON is nested too deeply") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        data_start = 8 + hlen
        data_size = size - data_start
        spans = []
        for name, entry in header.items():
            if name == "__metadata__":
                if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                    raise self._fail("__metadata__ must map strings to strings")
                self.metadata = dict(entry)
                continue
            info = self._entry(name, entry, data_start, data_size)
            self.tensors[name] = info
            spans.append((info.start, info.start + info.nbytes, name))
        spans.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0 and e0 > s0 and e1 > s1:
                raise self._fail(f"tensors {n0!r} and {n1!r} overlap")

    def _entry(self, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise self._fail(f"entry {name!r} is not an object")
        tag = entry.get("dtype")
        if tag in UNREAD_TAGS:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name!r} has dtype {tag}, which ckptflow does not read (it reads "
                f"{', '.join(DTYPES)})"
            )
        if not isinstance(tag, str) or tag not in DTYPES:
            raise self._fail(f"tensor {name!r} has unknown dtype {tag!r}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise self._fail(f"tensor {name!r} has an invalid shape {shape!r}")
        if tag == "F4":
            if not shape or shape[-1] % 2:
                raise self._fail(f"packed FP4 tensor {name!r} has shape {shape}: its last axis must be even")
            shape = shape[:-1] + [shape[-1] // 2]  # bytes
        offs = entry.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise self._fail(f"tensor {name!r} has invalid data_offsets {offs!r}")
        dtype = DTYPES[tag]
        if math.prod(d for d in shape if d) * dtype.itemsize >= 2**63:  # numpy's limit, even for a 0-sized tensor
            raise self._fail(f"tensor {name!r} has an impossibly large shape {shape}")
        expected = math.prod(shape) * dtype.itemsize
        if offs[1] - offs[0] != expected:
            raise self._fail(
                f"tensor {name!r} of shape {shape} {tag} needs {expected} bytes but its offsets span "
                f"{offs[1] - offs[0]}"
            )
        if offs[1] > data_size:
            raise self._fail(
                f"tensor {name!r} ends at byte {offs[1]} but the data section has {data_size} bytes (truncated?)"
            )
        return TensorInfo(name, dtype, tuple(shape), data_start + offs[0], expected, self.path)


def _byte_range(info: TensorInfo, rows: slice | None) -> tuple[tuple[int, ...], int, int]:
    """Shape, file offset and size of a tensor or of a contiguous range of its leading axis."""
    shape, offset, nbytes = info.shape, info.start, info.nbytes
    if rows is not None:
        start, stop, step = rows.indices(shape[0])
        if step != 1:
            raise ValueError("row ranges must be contiguous")
        shape = (stop - start,) + shape[1:]
        offset += start * info.row_bytes
        nbytes = (stop - start) * info.row_bytes
    return shape, offset, nbytes


def read_tensor(info: TensorInfo, rows: slice | None = None) -> np.ndarray:
    """Read a tensor, or a contiguous range of its leading axis, into a pooled numpy array (large reads bypass
    the page cache: `converters.io.direct_io`)."""
    shape, offset, nbytes = _byte_range(info, rows)
    try:
        raw = direct_io.read_range(info.path, offset, nbytes)
    except CorruptFileError:
        raise CorruptFileError(f"{info.path}: unexpected end of file while reading {info.name!r}") from None
    return raw.view(info.dtype).reshape(shape)


class SafetensorsFolder:
    """All tensors of an HF model folder (sharded with an index, a single file, or loose shards)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CkptflowError(f"{self.folder}: not a directory")
        self.tensors: dict[str, TensorInfo] = {}
        files = self._files()
        for path in files:
            for name, info in SafetensorsFile(path).tensors.items():
                if name in self.tensors:
                    raise CorruptFileError(
                        f"tensor {name!r} appears in both {self.tensors[name].path.name} and {path.name}"
                    )
                self.tensors[name] = info
        self._check_index()

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_NAME
        if index.exists():
            self.index = _load_index(index)
            names = sorted(set(self.index.values()))
            missing = [n for n in names if not (self.folder / n).exists()]
            if missing:
                raise CkptflowError(f"{index}: lists shard files that are missing: {', '.join(missing)}")
            return [self.folder / n for n in names]
        self.index = None
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))
            hint = (
                f" (found pickled weights {', '.join(pickles[:3])}: ckptflow never unpickles files;"
                " convert them to safetensors with a trusted tool first)"
                if pickles
                else ""
            )
            raise CkptflowError(f"{self.folder}: no *.safetensors files{hint}")
        return files

    def _check_index(self) -> None:
        if self.index is None:
            return
        for name, fname in self.index.items():
            info = self.tensors.get(name)
            if info is None:
                raise CorruptFileError(f"{INDEX_NAME} maps {name!r} to {fname} but that file does not contain it")
            if info.path.name != fname:
                raise CorruptFileError(f"{INDEX_NAME} maps {name!r} to {fname} but it is in {info.path.name}")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MappingError(f"missing tensor {name!r} in {self.folder}") from None

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        return read_tensor(self.info(name), rows)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _load_index(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
        wm = data["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CorruptFileError(
            f"{path}: not a valid safetensors index (needs a 'weight_map' of name -> file)"
        ) from None
    for fname in wm.values():
        if "/" in fname or "\\" in fname or fname.startswith("."):
            raise CorruptFileError(f"{path}: shard name {fname!r} is not a plain file name")
    return wm


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: Sequence[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy packing in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header_bytes(tensors: Sequence[PlannedTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        shape = list(t.shape) if t.dtype != FP4X2 else [*t.shape[:-1], 2 * t.shape[-1]]  # F4 counts values
        header[t.name] = {"dtype": TAGS[t.dtype], "shape": shape, "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def will_need(info: TensorInfo, rows: slice | None = None) -> None:
    """Start reading a tensor (or a row range) now, so it is in memory by the time it is read."""
    if info.start < 0:
        return
    _, offset, nbytes = _byte_range(info, rows)
    direct_io.advise_willneed(info.path, offset, nbytes)


class _Hasher:
    """Digests (`content_hasher`) of a file and of each of its tensors, computed on a thread of its own
    as the blocks are written. Both passes over every byte on one thread keep ahead of the writing (BLAKE3 on one
    core is faster than the disk: docs/performance.md, "Speed"). Blocks queue up in order, at most `depth` of them, so
    memory stays bounded."""

    def __init__(self, header: bytes, depth: int = 1):
        self.file = content_hasher(header)
        self.tensors: dict[str, str] = {}
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._t = threading.Thread(target=self._run, name="ckptflow-hash", daemon=True)
        self._t.start()

    def _run(self) -> None:
        current = content_hasher()
        while (item := self._q.get()) is not None:
            name, raw, last = item
            try:
                self.file.update(raw)
                current.update(raw)
            except BaseException as e:  # noqa: BLE001 - surfaced by finish()
                self._error = e
            if last:
                self.tensors[name] = current.hexdigest()
                current = content_hasher()

    def add(self, name: str, raw: memoryview, last: bool) -> None:
        self._q.put((name, raw, last))

    def finish(self) -> None:
        self._q.put(None)
        self._t.join()
        if self._error is not None:
            raise self._error


class ShardWriter:
    """Writes one safetensors shard whose header is known up front; tensors arrive in order, possibly in row chunks.

    The file's digest and each tensor's (what the manifest needs) are computed as the bytes are written."""

    def __init__(self, path: Path, tensors: Sequence[PlannedTensor], metadata: dict[str, str] | None = None):
        self.path = path
        self.tensors = list(tensors)
        self._f = direct_io.SequentialWriter(path)  # around the page cache where the filesystem allows
        header = _header_bytes(self.tensors, metadata or {"format": "pt"})
        try:
            self._f.write(header)
        except BaseException:
            self._f.abort()
            raise
        self._i = 0
        self._written = 0  # bytes of the current tensor written so far
        self._hash = _Hasher(header)

    def write(self, name: str, data: np.ndarray) -> None:
        """Append `data` (the whole tensor or its next rows) to tensor `name`, which must be the current one."""
        t = self.tensors[self._i]
        if name != t.name:
            raise RuntimeError(f"shard {self.path.name}: expected tensor {t.name!r}, got {name!r}")
        if data.dtype != t.dtype or data.shape[1:] != t.shape[1:]:
            raise MappingError(f"{name}: expected {t.dtype}{list(t.shape)}, got {data.dtype}{list(data.shape)}")
        data = np.ascontiguousarray(data)
        raw = memoryview(data.reshape(-1).view(np.uint8)) if data.size else memoryview(b"")
        self._written += data.nbytes
        if self._written > t.nbytes:
            raise MappingError(f"{name}: more data than its shape {list(t.shape)} holds")
        self._f.write(raw)
        self._hash.add(t.name, raw, self._written == t.nbytes)  # `raw` keeps the block alive until hashed
        if self._written == t.nbytes:
            self._i += 1
            self._written = 0

    @property
    def done(self) -> bool:
        """Every planned tensor has all its bytes."""
        return self._i == len(self.tensors)

    def abort(self) -> None:
        """Close the file after a failure (a disk-full flush fails again: ignored), so its space can be freed."""
        try:
            self._hash.finish()
        except BaseException:  # noqa: BLE001 - the failure being handled is the one to report
            pass
        self._f.abort()

    def close(self) -> None:
        if self._i != len(self.tensors):
            self.abort()
            raise RuntimeError(f"shard {self.path.name}: closed after {self._i} of {len(self.tensors)} tensors")
        try:
            self._f.close()  # the rest of the data, then fsync
        finally:
            self._hash.finish()

    @property
    def digest(self) -> str:
        """The file's BLAKE3 (complete once closed)."""
        return self._hash.file.hexdigest()

    @property
    def tensor_digests(self) -> dict[str, str]:
        """Each tensor's BLAKE3 (complete once closed)."""
        return self._hash.tensors


def write_index(folder: Path, shards: Sequence[Sequence[PlannedTensor]], names: Sequence[str]) -> None:
    if len(shards) == 1:
        return
    weight_map = {t.name: fname for shard, fname in zip(shards, names) for t in shard}
    total = sum(t.nbytes for shard in shards for t in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def save_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Small helper for tests and sidecars: write a dict of arrays as one safetensors file."""
    plan = [PlannedTensor(n, tuple(a.shape), a.dtype) for n, a in tensors.items()]
    w = ShardWriter(Path(path), plan)
    for n, a in tensors.items():
        w.write(n, a)
    w.close()


def iter_row_chunks(rows: int, row_bytes: int, chunk_bytes: int) -> Iterator[slice]:
    step = max(1, chunk_bytes // max(1, row_bytes))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def is_safetensors_folder(path: Path) -> bool:
    return path.is_dir() and (any(path.glob("*.safetensors")) or (path / INDEX_NAME).exists())

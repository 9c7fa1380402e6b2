"""Golden logits files: HF logits saved once, compared against later (JSON lines, never pickle).

One JSON object per line, in MaxText's golden-logits format (`prompt`, `tokens`, `logits` as
`[positions][vocab]` floats; MaxText's own files may hold `[1][positions][vocab]`) plus descriptive
fields (`name`, `dtype`, `model_type`, `vocab_size`, ...). Floats are written with 9 significant
digits, which round-trips float32 exactly.

A prompt's logits can be gigabytes of text, so neither side ever holds a whole `[T, V]` array:

    with GoldenWriter(path, prompts, vocab_size, meta) as w:    # blocks of columns, any order
        w.write_block(prompt_index, v0, logits[:, v0:v1])
    with GoldenFile(path) as g:                                 # parsed once into float32 files
        for rec in g.records:
            block = rec.logits_block(v0, v1)

Both keep the float32 data in temporary files (the writer's next to its output) and touch them one
block or one row at a time, so resident memory stays at about one row or one block.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converters.errors import CkptflowError, CorruptFileError
from converters.verify.prompts import Prompt

_RESERVED = ("name", "prompt", "tokens", "logits")
_CHUNK = 1 << 20  # bytes read at a time; with one row, the reader's working memory


def _refuse_pickle(path: Path, verb: str) -> None:
    if path.suffix in (".pkl", ".pickle"):
        if verb == "write":
            raise CkptflowError("golden files are JSON lines; use a .jsonl name")
        raise CkptflowError(f"{path}: pickle golden files are not read (unsafe); convert it to .jsonl")


class _TempDir:
    """A temporary directory removed by cleanup(), or when garbage-collected, or at exit."""

    def __init__(self, parent: str | os.PathLike | None, prefix: str):
        self.path = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    @property
    def alive(self) -> bool:
        return self._finalizer.alive

    def cleanup(self) -> None:
        self._finalizer()


# ---- writing -------------------------------------------------------------------------------------


class GoldenWriter:
    """Collects `[T_p, v1-v0]` blocks of every prompt's logits, then writes the `.jsonl` atomically.

    Blocks are stored in a per-prompt float32 file in a temporary directory next to the output, so
    a killed run leaves only that `.<name>.*.tmp` directory, never a finished-looking `.jsonl`.
    """

    def __init__(self, path: str | os.PathLike, prompts: list[Prompt], vocab_size: int, meta: dict):
        self.path = Path(path)
        _refuse_pickle(self.path, "write")
        if not prompts:
            raise ValueError("no prompts to write")
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, not {vocab_size}")
        clash = [k for k in _RESERVED if k in meta]
        if clash:
            raise ValueError(f"meta may not set {', '.join(clash)} (written from the prompts)")
        if meta.get("vocab_size", vocab_size) != vocab_size:
            raise ValueError(f"meta vocab_size {meta['vocab_size']} != vocab_size {vocab_size}")
        for p in prompts:
            if p.length == 0:
                raise ValueError(f"prompt {p.name!r} has no tokens")
        self.prompts, self.vocab_size, self.meta = list(prompts), vocab_size, dict(meta)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _TempDir(self.path.parent, f".{self.path.name}.")
        self._covered = [np.zeros(vocab_size, dtype=bool) for _ in self.prompts]
        self._state = "open"
        for i, p in enumerate(self.prompts):
            with open(self._data(i), "wb") as f:
                f.truncate(p.length * vocab_size * 4)  # sparse: disk is used as blocks arrive

    def _data(self, i: int) -> Path:
        return self._tmp.path / f"prompt-{i}.f32"

    def _map(self, i: int, mode: str) -> np.memmap:
        return np.memmap(self._data(i), dtype=np.float32, mode=mode, shape=(self.prompts[i].length, self.vocab_size))

    def write_block(self, prompt_index: int, v0: int, block: np.ndarray) -> None:
        """Store columns `v0 : v0 + block.shape[1]` of prompt `prompt_index` (all its positions)."""
        if self._state != "open":
            raise CkptflowError(f"golden writer for {self.path} is already {self._state}")
        if not 0 <= prompt_index < len(self.prompts):
            raise IndexError(f"prompt index {prompt_index} out of range (0..{len(self.prompts) - 1})")
        p = self.prompts[prompt_index]
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[0] != p.length or not 0 <= v0 <= v0 + block.shape[1] <= self.vocab_size:
            raise ValueError(
                f"block {block.shape} at column {v0} does not fit prompt {p.name!r} "
                f"({p.length} positions x {self.vocab_size} columns)"
            )
        v1 = v0 + block.shape[1]
        # Checked here rather than at close: fail before the rest of a long run is computed.
        if not np.isfinite(block).all():
            raise CkptflowError(
                f"non-finite logits for prompt {p.name!r} (columns {v0}:{v1}); JSON cannot store NaN/inf"
            )
        # Mapped only for this call: a long-lived map would count every touched page as resident.
        mm = self._map(prompt_index, "r+")
        mm[:, v0:v1] = block
        del mm
        self._covered[prompt_index][v0:v1] = True

    def close(self) -> Path:
        """Check coverage, write the `.jsonl` (tmp file + os.replace) and remove the temporary files."""
        if self._state == "closed":
            return self.path
        if self._state != "open":
            raise CkptflowError(f"golden writer for {self.path} was aborted")
        try:
            self._check_coverage()
            tmp = self._tmp.path / self.path.name
            with open(tmp, "w", encoding="utf-8", newline="\n") as out:
                for i in range(len(self.prompts)):
                    self._write_record(out, i)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._tmp.cleanup()
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; no output file is created."""
        self._tmp.cleanup()
        if self._state == "open":
            self._state = "aborted"

    def __enter__(self) -> GoldenWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._state == "open":
            self.close()
        else:
            self.abort()

    def _check_coverage(self) -> None:
        for p, covered in zip(self.prompts, self._covered):
            missing = _false_ranges(covered)
            if missing:
                shown = ", ".join(f"{a}:{b}" for a, b in missing[:3])
                more = f" and {len(missing) - 3} more ranges" if len(missing) > 3 else ""
                raise CkptflowError(
                    f"golden file {self.path} incomplete: prompt {p.name!r} has no logits for columns {shown}{more}"
                )

    def _write_record(self, out, i: int) -> None:
        p = self.prompts[i]
        head = {"name": p.name, "prompt": p.text, "tokens": p.token_ids, **self.meta, "vocab_size": self.vocab_size}
        out.write(json.dumps(head)[:-1] + ', "logits": [')
        fmt = ",".join(["%.9g"] * self.vocab_size)
        row = np.empty(self.vocab_size, dtype=np.float32)
        with open(self._data(i), "rb") as f:
            for t in range(p.length):
                if f.readinto(row) != row.nbytes:
                    raise CkptflowError(f"temporary logits file for prompt {p.name!r} is short")
                # One '%' with a prebuilt format is about twice as fast as joining format() calls.
                out.write(("[" if t == 0 else ",[") + fmt % tuple(row.tolist()) + "]")
        out.write("]}\n")


def _false_ranges(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) ranges where `mask` is False."""
    edges = np.diff(np.concatenate(([1], mask.astype(np.int8), [1])))
    return list(zip(np.flatnonzero(edges == -1).tolist(), np.flatnonzero(edges == 1).tolist()))


def write_golden(path: str | os.PathLike, records: list[tuple[Prompt, np.ndarray]], meta: dict) -> Path:
    """Whole `[T, V]` arrays in, one `.jsonl` out: a convenience for tests and small data."""
    vocab = np.shape(records[0][1])[-1] if records else 0
    with GoldenWriter(path, [p for p, _ in records], vocab, meta) as w:
        for i, (_, logits) in enumerate(records):
            w.write_block(i, 0, logits)
    return w.path


# ---- reading -------------------------------------------------------------------------------------


@dataclass
class GoldenRecord:
    """One line of a golden file; its logits live in a temporary float32 file ([T, V], row-major)."""

    prompt: Prompt
    meta: dict  # every key but tokens/logits/prompt/name
    vocab_size: int  # columns of its logits
    _data: Path = field(repr=False, compare=False)
    _storage: _TempDir = field(repr=False, compare=False)  # keeps the data alive while the record is

    def logits_block(self, v0: int, v1: int) -> np.ndarray:
        """float32 `[T, v1 - v0]`: columns v0:v1 of every position (a copy)."""
        if not 0 <= v0 <= v1 <= self.vocab_size:
            raise ValueError(f"columns {v0}:{v1} outside [0, {self.vocab_size}]")
        if not self._storage.alive:
            raise CkptflowError("the golden file holding this record is closed")
        # Read row by row rather than through a map: a read fault maps the neighbouring cached pages
        # too (Linux fault-around, 64 KiB), so a narrow block over T rows would map T x 64 KiB.
        block = np.empty((self.prompt.length, v1 - v0), dtype=np.float32)
        with open(self._data, "rb", buffering=0) as f:
            for t, row in enumerate(block):
                f.seek((t * self.vocab_size + v0) * 4)
                if f.readinto(row) != row.nbytes:
                    raise CkptflowError(f"temporary logits file for {self.prompt.name!r} is short")
        return block


class GoldenFile:
    """A parsed golden file: `records` in file order. Close it (or use `with`) to free its temp files.

    Lines are parsed in chunks: the top-level `logits` value is converted row by row into a float32
    file; the rest of the line (every other key, in any order) goes through json.loads with the
    logits value replaced by `null`. Temporary files go to `tmp_dir`, by default next to the file
    (or the system temp directory if that is not writable).
    """

    def __init__(self, path: str | os.PathLike, tmp_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        _refuse_pickle(self.path, "read")
        if not self.path.is_file():
            raise CkptflowError(f"golden file not found: {self.path}")
        self._storage = _reader_storage(self.path, tmp_dir)
        try:
            with open(self.path, "rb") as f:
                self.records = _LineParser(self.path, f, self._storage).records()
        except BaseException:
            self._storage.cleanup()
            raise
        if not self.records:
            self._storage.cleanup()
            raise CorruptFileError(f"{self.path}: no records")

    def close(self) -> None:
        self._storage.cleanup()

    def __enter__(self) -> GoldenFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reader_storage(path: Path, tmp_dir) -> _TempDir:
    prefix = f".{path.name}."
    if tmp_dir is not None:
        return _TempDir(tmp_dir, prefix)
    try:
        return _TempDir(path.parent, prefix)
    except OSError:  # read-only folder: fall back to TMPDIR
        return _TempDir(None, prefix)


def read_golden(path: str | os.PathLike) -> list[GoldenRecord]:
    """All records of a golden file; their temporary data is removed once no record is referenced."""
    return GoldenFile(path).records


class _Buffer:
    """Chunked reads of a binary file with a cursor."""

    def __init__(self, f):
        self.f, self.buf, self.pos = f, b"", 0

    def fill(self) -> bool:
        """Append the next chunk (dropping consumed bytes); False at end of file."""
        data = self.f.read(_CHUNK)
        if not data:
            return False
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def peek(self) -> int | None:
        """The next byte that is not a space, tab or CR (skipped), or None at end of file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in b" \t\r":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return None


_OUTSIDE = re.compile(rb'["\[\]{}:\n]')  # bytes that matter outside strings
_INSIDE = re.compile(rb'["\\\n]')  # ... and inside them
# What may appear between a row's brackets: JSON numbers, plus the NaN/Infinity Python's json writes.
_ROW_BYTES = b"0123456789+-.eE, \t\rNaInfity"
_QUOTE, _BACKSLASH, _NEWLINE, _COLON = b'"\\\n:'


class _LineParser:
    """Parses golden lines from a _Buffer: rows of `logits` to float32 files, the rest via json.loads."""

    def __init__(self, path: Path, f, storage: _TempDir):
        self.path, self.b, self.storage = path, _Buffer(f), storage
        self.line = 0

    def error(self, msg: str) -> CorruptFileError:
        return CorruptFileError(f"{self.path}:{self.line}: {msg}")

    def records(self) -> list[GoldenRecord]:
        out: list[GoldenRecord] = []
        while True:
            self.line += 1
            head, shape, end = self._parse_line(self.storage.path / f"record-{len(out)}.f32")
            if head.strip() or shape is not None:
                out.append(self._record(head, shape, len(out)))
            if end == "eof":
                return out

    def _parse_line(self, data: Path) -> tuple[bytearray, tuple[int, int] | None, str]:
        """(the line with its logits value replaced by null, logits shape or None, "eol" | "eof")."""
        head, shape = bytearray(), None
        scanner = _HeadScanner(self.b, head)
        while (end := scanner.scan()) == "logits":
            if shape is not None:
                raise self.error("'logits' appears twice")
            with open(data, "wb") as out:
                shape = self._logits(out)
            head += b"null"
        return head, shape, end

    def _record(self, head: bytearray, shape: tuple[int, int] | None, index: int) -> GoldenRecord:
        try:
            obj = json.loads(bytes(head))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self.error(f"not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(obj, dict) or "tokens" not in obj or shape is None:
            raise self.error("expected an object with 'tokens' and 'logits'")
        try:
            tokens = [int(t) for t in obj["tokens"]]
        except (TypeError, ValueError):
            raise self.error("'tokens' must be a list of integer ids") from None
        rows, cols = shape
        if rows != len(tokens):
            raise self.error(f"logits have {rows} rows, which does not match {len(tokens)} tokens")
        name = obj.get("name") or f"golden-{index}"
        meta = {k: v for k, v in obj.items() if k not in _RESERVED}
        prompt = Prompt(name=name, token_ids=tokens, text=obj.get("prompt"))
        return GoldenRecord(prompt, meta, cols, self.storage.path / f"record-{index}.f32", self.storage)

    # -- the logits value: [[row], ...] or [[[row], ...]] -----------------------------------------

    def _expect(self, char: bytes, what: str) -> None:
        c = self.b.peek()
        if c != char[0]:
            raise self._unexpected(c, what)
        self.b.pos += 1

    def _unexpected(self, c: int | None, what: str) -> CorruptFileError:
        if c is None or c == _NEWLINE:
            return self.error("line ends inside 'logits' (truncated file?)")
        return self.error(f"'logits': expected {what}, found {chr(c)!r}")

    def _logits(self, out) -> tuple[int, int]:
        """Stream the value into `out` as float32 rows; returns (rows, columns)."""
        self._expect(b"[", "a [positions][vocab] list")
        self._expect(b"[", "a list of rows")
        batched = self.b.peek() == ord("[")  # MaxText's [1][T][V]
        if batched:
            self.b.pos += 1
        rows, cols = 0, None
        while True:
            row = self._row(rows + 1)
            if cols is None:
                cols = len(row)
            elif len(row) != cols:
                raise self.error(f"'logits' row {rows + 1} has {len(row)} values, row 1 has {cols}")
            out.write(row)
            rows += 1
            c = self.b.peek()
            if c == ord("]"):
                self.b.pos += 1
                break
            if c != ord(","):
                raise self._unexpected(c, "',' or ']' after a row")
            self.b.pos += 1
            self._expect(b"[", "'[' starting a row")
        if batched:
            if self.b.peek() == ord(","):
                raise self.error("'logits' holds more than one sequence ([B][T][V] with B > 1)")
            self._expect(b"]", "']' closing [1][T][V]")
        return rows, cols

    def _row(self, n: int) -> np.ndarray:
        """The numbers up to the next ']' (consumed), as float32."""
        b, parts = self.b, []
        while True:
            end = b.buf.find(b"]", b.pos)
            part = b.buf[b.pos : end if end >= 0 else len(b.buf)]
            bad = part.translate(None, _ROW_BYTES)  # checked per chunk so garbage never piles up
            if bad:
                raise self._unexpected(bad[0], f"numbers in row {n}")
            parts.append(part)
            if end >= 0:
                b.pos = end + 1
                break
            b.pos = len(b.buf)
            if not b.fill():
                raise self._unexpected(None, "")
        text = b"".join(parts)
        if not text.strip(b" \t\r"):
            raise self.error(f"'logits' row {n} is empty")
        try:
            values = np.fromstring(text, dtype=np.float32, sep=",")
        except ValueError:
            values = None
        # fromstring stops quietly at a trailing comma, hence the count.
        if values is None or len(values) != text.count(b",") + 1:
            raise self.error(f"'logits' row {n} is not a list of numbers")
        return values


class _HeadScanner:
    """Copies the non-logits bytes of a line into `head`, tracking JSON strings and nesting.

    scan() stops right after the ':' of a top-level "logits" key ("logits"), or at the end of the
    line ("eol", newline consumed) or of the file ("eof"). Call it again to continue the line.
    """

    def __init__(self, b: _Buffer, head: bytearray):
        self.b, self.head = b, head
        self.depth, self.in_string, self.escape = 0, False, False
        self.string_start = 0
        self.after_logits = False  # the last special byte closed a "logits" string at depth 1

    def scan(self) -> str:
        b, head = self.b, self.head
        while True:
            if b.pos >= len(b.buf) and not b.fill():
                return "eof"
            if self.escape:  # the escaped byte, possibly at the start of the next chunk
                self.escape = False
                if b.buf[b.pos] != _NEWLINE:  # a raw newline still ends the line
                    head.append(b.buf[b.pos])
                    b.pos += 1
                continue
            m = (_INSIDE if self.in_string else _OUTSIDE).search(b.buf, b.pos)
            if m is None:
                head += b.buf[b.pos :]
                b.pos = len(b.buf)
                continue
            j = m.start()
            c = b.buf[j]
            if c == _NEWLINE:
                head += b.buf[b.pos : j]
                b.pos = j + 1
                return "eol"
            head += b.buf[b.pos : j + 1]
            b.pos = j + 1
            if self._step(c):
                return "logits"

    def _step(self, c: int) -> bool:
        """Update the state for special byte `c`; True if it is the ':' after a top-level "logits"."""
        if self.in_string:
            if c == _BACKSLASH:
                self.escape = True
            else:  # closing quote
                self.in_string = False
                self.after_logits = self.depth == 1 and self.head[self.string_start :] == b'"logits"'
            return False
        found = c == _COLON and self.after_logits
        if c == _QUOTE:
            self.in_string, self.string_start = True, len(self.head) - 1
        elif c in b"[{":
            self.depth += 1
        elif c in b"]}":
            self.depth -= 1
        self.after_logits = False
        return found


def estimated_size_bytes(prompts: list[Prompt], vocab: int) -> int:
    """~13 bytes per logit; the default prompts on a 150k vocabulary make a ~1 GB file."""
    return int(sum(p.length for p in prompts) * vocab * 13 + 1024 * len(prompts))


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    e = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**e:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][e]}"

"""Golden file I/O: streaming writer and reader, format compatibility, corrupt input, memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.errors import CkptflowError, CorruptFileError
from converters.verify import golden
from converters.verify.golden import GoldenFile, GoldenWriter, read_golden, write_golden
from converters.verify.prompts import Prompt

REPO = Path(__file__).resolve().parents[2]
# Tiny chunks split numbers, keys, escapes and brackets across reads; the default covers the usual path.
CHUNKS = [1, 3, 7, 64, golden._CHUNK]


@pytest.fixture(params=CHUNKS, ids=lambda n: f"chunk{n}")
def chunk(request, monkeypatch):
    monkeypatch.setattr(golden, "_CHUNK", request.param)
    return request.param


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def nasty_logits(rng, t: int, v: int) -> np.ndarray:
    """Random float32 over the whole exponent range, with the edge values 9 digits must round-trip."""
    x = (rng.normal(size=(t, v)) * 10.0 ** rng.integers(-40, 38, size=(t, v))).astype(np.float32)
    f = np.finfo(np.float32)
    x.flat[:6] = [f.max, -f.max, f.tiny, f.smallest_subnormal, -0.0, 0.0]
    return x


def test_round_trip_shuffled_blocks_is_bit_exact(tmp_path, chunk):
    rng = np.random.default_rng(0)
    vocab = 50
    prompts = [
        Prompt("a", [5], 'quote " and \n newline, "logits": [[1]] \\ é'),
        Prompt("b", [1, 2, 3, 4]),
        Prompt("c", list(range(7)), "plain"),
    ]
    logits = [nasty_logits(rng, p.length, vocab) for p in prompts]
    blocks = [(i, v0) for i in range(len(prompts)) for v0 in range(0, vocab, 8)]
    rng.shuffle(blocks)
    meta = {"dtype": "float32", "model_type": "llama", "source": "/x"}
    with GoldenWriter(tmp_path / "g.jsonl", prompts, vocab, meta) as w:
        for i, v0 in blocks:
            w.write_block(i, v0, logits[i][:, v0 : v0 + 8])
    assert w.close() == tmp_path / "g.jsonl" and leftovers(tmp_path) == []

    with GoldenFile(tmp_path / "g.jsonl") as g:
        assert [r.prompt.name for r in g.records] == ["a", "b", "c"]
        for p, want, rec in zip(prompts, logits, g.records):
            assert (rec.prompt.token_ids, rec.prompt.text, rec.vocab_size) == (p.token_ids, p.text, vocab)
            assert rec.meta == {**meta, "vocab_size": vocab}
            got = np.concatenate([rec.logits_block(v0, min(v0 + 13, vocab)) for v0 in range(0, vocab, 13)], axis=1)
            assert got.dtype == np.float32
            assert got.tobytes() == want.tobytes()  # bit-exact, -0.0 and subnormals included
        assert leftovers(tmp_path) != []  # the float32 copies live while the file is open
    assert leftovers(tmp_path) == []
    with pytest.raises(CkptflowError, match="closed"):
        rec.logits_block(0, 1)


def test_output_is_plain_json_lines_in_maxtext_format(tmp_path):
    logits = np.array([[1.5, -2.0], [3.0, 0.1]], dtype=np.float32)
    path = write_golden(tmp_path / "g.jsonl", [(Prompt("x", [1, 2], "hi"), logits)], {"dtype": "float32"})
    line = path.read_text().splitlines()[0]
    obj = json.loads(line)
    assert list(obj)[-1] == "logits" and obj["tokens"] == [1, 2] and obj["prompt"] == "hi"
    assert line.endswith('"logits": [[1.5,-2],[3,0.100000001]]}')  # %.9g: float32 0.1 round-trips


def test_maxtext_style_file_is_read(tmp_path, chunk):
    a = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    b = -np.arange(3, dtype=np.float32).reshape(1, 3)
    lines = [
        # logits first, as [1][T][V], with default json.dumps spacing and extra keys holding "logits"
        json.dumps(
            {
                "logits": [a.tolist()],
                "note": "logits",
                "extra": {"logits": [[9]]},
                "tokens": [3, 4],
                "prompt": "I love to",
            }
        ),
        "",  # blank lines are skipped
        '  {"tokens":[7],"prompt":"x","logits":[ [ -0.0 , -1 ,-2.0E0 ] ] , "dtype" : "bfloat16"}\r',
    ]
    f = tmp_path / "golden_data_x.jsonl"
    f.write_text("\n".join(lines))  # and no newline after the last record
    recs = read_golden(f)
    assert [r.prompt.name for r in recs] == ["golden-0", "golden-1"]
    assert recs[0].meta == {"note": "logits", "extra": {"logits": [[9]]}} and recs[1].meta == {"dtype": "bfloat16"}
    np.testing.assert_array_equal(recs[0].logits_block(0, 3), a)
    np.testing.assert_array_equal(recs[1].logits_block(1, 3), b[:, 1:])
    assert recs[1].logits_block(0, 1).tobytes() == np.float32(-0.0).tobytes()


def test_read_golden_keeps_data_until_records_are_dropped(tmp_path):
    path = write_golden(tmp_path / "g.jsonl", [(Prompt("x", [1]), np.ones((1, 4), np.float32))], {})
    recs = read_golden(path)
    assert leftovers(tmp_path) != []
    np.testing.assert_array_equal(recs[0].logits_block(0, 4), np.ones((1, 4)))
    del recs
    assert leftovers(tmp_path) == []


GOOD = '{"tokens": [1, 2], "logits": [[1.0, 2.0], [3.0, 4.0]]}'


@pytest.mark.parametrize(
    "bad,match",
    [
        ('{"tokens": [1, 2], "logits": [[1.0, 2.0], [3.0, 4.0, 5.0]]}', "row 2 has 3 values, row 1 has 2"),
        ('{"tokens": [1, 2, 3], "logits": [[1.0, 2.0], [3.0, 4.0]]}', "2 rows, which does not match 3 tokens"),
        ('{"tokens": [1, 2], "logits": [[1.0, 2.0], [3.0, 4', "truncated"),
        ('{"tokens": [1, 2], "logits": [[1.0, 2.0], [3.0, 4.0]]', "not valid JSON"),
        ("hello world", "not valid JSON"),
        ('{"tokens": [1]}', "'tokens' and 'logits'"),
        ('{"tokens": [1], "logits": [[1.0, "x"]]}', "numbers in row 1"),
        ('{"tokens": [1], "logits": [[1.0, 2.0,]]}', "row 1 is not a list of numbers"),
        ('{"tokens": [1], "logits": [[1.0 2.0]]}', "row 1 is not a list of numbers"),
        ('{"tokens": [1], "logits": [[]]}', "row 1 is empty"),
        ('{"tokens": [1], "logits": [1.0]}', "a list of rows"),
        ('{"tokens": [1], "logits": null}', "a \\[positions\\]\\[vocab\\] list"),
        ('{"tokens": [1], "logits": [[[1.0]], [[2.0]]]}', "more than one sequence"),
        ('{"tokens": [1], "logits": [[1.0]], "logits": [[2.0]]}', "appears twice"),
        ('{"tokens": "ab", "logits": [[1.0], [2.0]]}', "list of integer ids"),
    ],
)
def test_corrupt_lines_name_the_line(tmp_path, chunk, bad, match):
    f = tmp_path / "g.jsonl"
    f.write_text(f"{GOOD}\n\n{bad}\n{GOOD}\n")
    with pytest.raises(CorruptFileError, match=f"g.jsonl:3: .*{match}"):
        GoldenFile(f)
    assert leftovers(tmp_path) == []


def test_truncated_last_line(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(GOOD + "\n" + GOOD[:40])
    with pytest.raises(CorruptFileError, match="g.jsonl:2: line ends inside 'logits' \\(truncated"):
        GoldenFile(f)


@pytest.mark.parametrize(
    "name,content,error,match",
    [
        ("g.jsonl", "", CorruptFileError, "no records"),
        ("g.jsonl", "\n  \n", CorruptFileError, "no records"),
        ("g.pkl", GOOD, CkptflowError, "pickle"),
        ("missing.jsonl", None, CkptflowError, "not found"),
    ],
)
def test_unreadable_files(tmp_path, name, content, error, match):
    f = tmp_path / name
    if content is not None:
        f.write_text(content)
    with pytest.raises(error, match=match):
        GoldenFile(f)
    assert leftovers(tmp_path) == []


# ---- writer refusals: nothing finished-looking is left behind -----------------------------------

PROMPTS = [Prompt("short", [1, 2]), Prompt("long", [1, 2, 3])]


def test_missing_columns_are_refused(tmp_path):
    out = tmp_path / "g.jsonl"
    with pytest.raises(CkptflowError, match="prompt 'long' has no logits for columns 4:6, 8:10"):
        with GoldenWriter(out, PROMPTS, 10, {}) as w:
            w.write_block(0, 0, np.zeros((2, 10)))
            for v0 in (0, 6):
                w.write_block(1, v0, np.zeros((3, 2)))
            w.write_block(1, 2, np.zeros((3, 2)))
    assert not out.exists() and leftovers(tmp_path) == []


def test_non_finite_logits_are_refused(tmp_path):
    out = tmp_path / "g.jsonl"
    with pytest.raises(CkptflowError, match="non-finite logits for prompt 'long'"):
        with GoldenWriter(out, PROMPTS, 4, {}) as w:
            w.write_block(0, 0, np.zeros((2, 4)))
            w.write_block(1, 0, np.array([[0.0, 1.0, 2.0, np.nan]] * 3))
    assert not out.exists() and leftovers(tmp_path) == []


def test_failed_write_keeps_the_previous_file(tmp_path):
    out = write_golden(tmp_path / "g.jsonl", [(PROMPTS[0], np.ones((2, 3)))], {})
    before = out.read_bytes()
    with pytest.raises(RuntimeError):
        with GoldenWriter(out, PROMPTS, 3, {}) as w:
            w.write_block(0, 0, np.zeros((2, 3)))
            raise RuntimeError("the model crashed")
    assert out.read_bytes() == before and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "args,error,match",
    [
        (("g.pkl", PROMPTS, 4, {}), CkptflowError, "JSON lines"),
        (("g.jsonl", PROMPTS, 4, {"tokens": []}), ValueError, "may not set tokens"),
        (("g.jsonl", PROMPTS, 4, {"vocab_size": 5}), ValueError, "vocab_size"),
        (("g.jsonl", [Prompt("e", [])], 4, {}), ValueError, "no tokens"),
        (("g.jsonl", [], 4, {}), ValueError, "no prompts"),
    ],
)
def test_bad_writer_arguments(tmp_path, args, error, match):
    with pytest.raises(error, match=match):
        GoldenWriter(tmp_path / args[0], *args[1:])
    assert list(tmp_path.iterdir()) == []


def test_bad_blocks(tmp_path):
    with GoldenWriter(tmp_path / "g.jsonl", PROMPTS, 4, {}) as w:
        with pytest.raises(ValueError, match="does not fit"):
            w.write_block(0, 2, np.zeros((2, 3)))  # past the last column
        with pytest.raises(ValueError, match="does not fit"):
            w.write_block(0, 0, np.zeros((3, 4)))  # wrong number of positions
        with pytest.raises(IndexError):
            w.write_block(2, 0, np.zeros((2, 4)))
        w.abort()
    assert list(tmp_path.iterdir()) == []


KILLED = """
import os, sys, numpy as np
from converters.verify.golden import GoldenWriter
from converters.verify.prompts import Prompt
w = GoldenWriter(sys.argv[1], [Prompt("p", [1, 2])], 4, {})
w.write_block(0, 0, np.zeros((2, 4)))
os._exit(9)  # killed before close: no cleanup code runs
"""


def test_killed_writer_leaves_no_jsonl(tmp_path):
    p = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / "g.jsonl")], cwd=REPO, capture_output=True)
    assert p.returncode == 9, p.stderr
    assert [f.name for f in tmp_path.iterdir() if not f.name.endswith(".tmp")] == []


# ---- memory ---------------------------------------------------------------------------------------

# One record of T x V float32 logits. 300 x 100_000 = 120 MB as float32, ~365 MB of text; the test
# takes ~12 s on 2 cores (formatting ~200 ns and parsing ~100 ns per value). The full-size case
# (600 x 200_000, 480 MB / 1.5 GB of text) behaves the same, 4x slower.
T, V, BLOCK = 300, 100_000, 1024
RECORD_BYTES = T * V * 4
# Peak RSS growth must stay under a quarter of the record's float32 size. Anything holding the
# record at once fails: a plain [T, V] float32 array is 4x the budget (the "control" run checks the
# measure sees it), and the old json.loads reader (line string + one Python float per value) grew by
# 1.6 GB on a 120 MB record. The streaming code holds an I/O chunk, one row of text and allocator
# slack: 10-15 MB measured, the same for T = 100 and T = 400.
BUDGET = RECORD_BYTES // 4

# ru_maxrss is no baseline here: Linux keeps it across fork+exec, so a child starts with the pytest
# process's peak. The high-water mark in /proc is reset instead (clear_refs "5", Linux >= 4.0).
MEMORY = """
import sys, time, numpy as np
from converters.verify.golden import GoldenFile, GoldenWriter
from converters.verify.prompts import Prompt
mode, path, T, V, B = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])

def block(v0):  # the same pseudo-random block on both sides, never the whole record
    return np.random.default_rng(v0).standard_normal((T, min(v0 + B, V) - v0), dtype=np.float32)

def status_bytes(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # peak RSS := current RSS
base = status_bytes("VmRSS:")
t0 = time.perf_counter()
if mode == "write":
    with GoldenWriter(path, [Prompt("big", list(range(T)))], V, {"dtype": "float32"}) as w:
        for v0 in reversed(range(0, V, B)):
            w.write_block(0, v0, block(v0))
elif mode == "control":  # what holding the record would cost: proves the measure is not vacuous
    whole = np.ones((T, V), dtype=np.float32)
    del whole
else:
    with GoldenFile(path) as g:
        (rec,) = g.records
        for v0 in range(0, V, B):
            assert rec.logits_block(v0, min(v0 + B, V)).tobytes() == block(v0).tobytes(), v0
grown = status_bytes("VmHWM:") - base
print(grown, time.perf_counter() - t0)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads and resets the peak RSS in /proc")
def test_large_record_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    grown = {}
    for mode in ("control", "write", "read"):
        p = subprocess.run(
            [sys.executable, "-c", MEMORY, mode, str(path), str(T), str(V), str(BLOCK)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert p.returncode == 0, p.stderr[-2000:]
        peak, seconds = p.stdout.split()
        grown[mode] = int(peak)
        print(f"{mode}: peak RSS +{grown[mode] / 2**20:.1f} MiB in {float(seconds):.1f} s")
    assert grown["control"] > RECORD_BYTES * 0.9
    assert grown["write"] < BUDGET and grown["read"] < BUDGET, (grown, BUDGET)
    assert path.stat().st_size > 2 * RECORD_BYTES  # it really was ~365 MB of text
    assert leftovers(tmp_path) == []

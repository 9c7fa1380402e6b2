"""Scale-out (`converters.convert.shares` and the `part=` / `finalize=` paths of `hf_to_maxtext` and `maxtext_to_hf`).

A conversion split into N parts and finalized must equal the single-process conversion: the same arrays
(restored with plain Orbax, so the merged multi-process layout is what MaxText would load), byte-identical HF
files, the same content `output_digest`. The parts must share the work without overlap or gaps, read only
the source files their share needs, and finalize must refuse (exit 2, nothing at OUT, parts kept) whenever
a part is missing, stale or damaged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from blake3 import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

from converters.convert import hf_to_maxtext, maxtext_to_hf, shares, to_hf, to_maxtext
from converters.errors import CkptflowError
from converters.outputs.manifest import MANIFEST, check_outputs, compute_output_digest

HF_SHARD = 40_000  # --to hf shard size: a tiny model exports several shards, so 3 parts each get some


# ----------------------------------------------------------------------------------------------- helpers


def restore(ckpt: Path) -> dict[str, np.ndarray]:
    """Every leaf of `ckpt/0/items` as plain Orbax (no ckptflow code) restores it, by '/'-joined path."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(Path(ckpt).absolute() / "0" / "items")
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else k)
        else:
            flat[prefix] = np.asarray(node)

    walk(tree, "")
    return flat


def assert_same_arrays(a: Path, b: Path) -> None:
    xa, xb = restore(a), restore(b)
    assert sorted(xa) == sorted(xb)
    assert any(k.startswith("params/params/decoder") for k in xa)
    for k in xa:
        assert (xa[k].dtype, xa[k].shape) == (xb[k].dtype, xb[k].shape), k
        assert xa[k].tobytes() == xb[k].tobytes(), f"{k} differs"


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def markers(out: Path) -> dict[str, dict]:
    """{part folder name: part.json} of the finished parts in OUT's staging folder."""
    stage = shares.staging_dir(out)
    if not stage.is_dir():
        return {}
    return {
        d.name: json.loads((d / shares.RECORD).read_text())
        for d in sorted(stage.iterdir())
        if d.name.startswith("part-") and (d / shares.RECORD).is_file()
    }


def in_parts(fn, src, out: Path, n: int, **kw) -> list[dict]:
    """Run parts 0..n-1, then finalize; OUT absent until then. Returns the parts' part.json (read before finalize)."""
    for i in range(n):
        fn(src, out, part=(i, n), **kw)
        assert not out.exists(), f"{out} exists after part {i}/{n}, before finalize"
    found = markers(out)
    assert sorted(found) == [shares.share_name(i, n) for i in range(n)]
    fn(src, out, finalize=True, **kw)
    return [found[shares.share_name(i, n)] for i in range(n)]


def chunks_by_part(found: list[dict]) -> dict[tuple[str, str], list[int]]:
    """(array, chunk origin) -> the parts that wrote it, from the parts' recorded chunk digests."""
    by: dict[tuple[str, str], list[int]] = {}
    for m in found:
        for name, chunks in m["digests"].items():
            for origin in chunks:
                by.setdefault((name, origin), []).append(m["part"])
    return by


def leftovers(out: Path) -> list[str]:
    """Hidden ckptflow siblings of OUT (staging folder, temp folders, lock)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.ckptflow-"))


def assert_finished_maxtext(out: Path, single: Path, found: list[dict], n: int) -> None:
    """OUT equals the single run, its manifest is right, and every part's sub-store was merged in."""
    assert_same_arrays(single, out)
    m = manifest(out)
    assert m["output_digest"] == manifest(single)["output_digest"] == compute_output_digest(out)
    assert check_outputs(out) == []
    for rel, meta in m["outputs"].items():
        assert blake3((out / rel).read_bytes()).hexdigest() == meta["blake3"], rel
    assert [p["part"] for p in m.get("parts", [])] == list(range(n))
    assert [p["digest"] for p in m["parts"]] == [shares.share_digest(x) for x in found]
    assert leftovers(out) == [], "staging folder or temp folders left behind"
    # no chunk written twice, every part had work here (these models have dozens of units), its store merged
    owners = chunks_by_part(found)
    assert all(len(ps) == 1 for ps in owners.values()), [k for k, ps in owners.items() if len(ps) > 1][:3]
    for x in found:
        assert x["files"], f"part {x['part']}/{n} wrote nothing"
        assert (out / "0" / "items" / f"ocdbt.process_{x['part']}").is_dir()
        assert sum(1 for k in m["outputs"] if k.startswith(f"0/items/ocdbt.process_{x['part']}/")) == len(x["files"])


# ------------------------------------------------------------------------------------ assign / parse_share


def test_assign_examples():
    """Equal items split evenly; a huge item gets its own part; empty input and N=1 are trivial."""
    assert shares.assign([10] * 6, 3) == [0, 0, 1, 1, 2, 2]
    assert shares.assign([10] * 7, 1) == [0] * 7
    assert shares.assign([], 4) == []
    assert shares.assign([100, 1, 1, 1], 2) == [0, 1, 1, 1]
    assert shares.assign([1, 1, 1, 100], 2) == [0, 0, 0, 1]
    assert shares.assign([0, 0, 0], 2) == [0, 0, 0]  # nothing to balance: no crash, all in range


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 10**9), max_size=60), st.integers(1, 9))
def test_assign_contiguous_complete_and_balanced(sizes, n):
    """Every item gets exactly one part in 0..N-1, parts are contiguous runs in order, and no part holds more
    than its share (total/N) plus one of its own items; an item as large as a share may leave a part empty."""
    owners = shares.assign(sizes, n)
    assert len(owners) == len(sizes)
    assert all(0 <= o < n for o in owners)
    assert owners == sorted(owners), "parts are not contiguous runs"
    total = sum(sizes)
    for p in range(n):
        mine = [s for s, o in zip(sizes, owners) if o == p]
        assert n * (sum(mine) - max(mine, default=0)) <= total, (p, mine)
        assert n * abs(sum(mine) - total / n) <= n * max(sizes, default=0) + 1e-6, (p, mine)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 50), st.integers(1, 60), st.integers(1, 9))
def test_assign_equal_items_differ_by_at_most_one(count, size, n):
    """Equal items: part sizes differ by at most one item."""
    owners = shares.assign([size] * count, n)
    per = [owners.count(p) for p in range(n)]
    assert max(per) - min(per) <= 1


@pytest.mark.parametrize("text,want", [("0/3", (0, 3)), ("2/3", (2, 3)), (" 1 / 2 ", (1, 2)), ("0/1", (0, 1))])
def test_parse_share_accepts(text, want):
    assert shares.parse_share(text) == want


@pytest.mark.parametrize(
    "text,says",
    [
        ("3/3", "0..N-1"),
        ("7/3", "0..N-1"),
        ("1/0", "N at least 1"),
        ("-1/2", "expected I/N"),
        ("a/b", "expected I/N"),
        ("1", "expected I/N"),
        ("", "expected I/N"),
        ("1/2/3", "expected I/N"),
    ],
)
def test_parse_share_refuses_with_a_clear_message(text, says):
    with pytest.raises(CkptflowError) as e:
        shares.parse_share(text)
    assert says in str(e.value) and "--part" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ HF -> MaxText

FAMILIES = ["llama3.1", "qwen3-moe"]  # dense, and a MoE with (expert, layer) stacks


@pytest.fixture(scope="module")
def singles(tiny_model, tmp_path_factory):
    """Single-process conversions, per (family, scan): the MaxText checkpoint and its HF export (several shards)."""
    cache: dict = {}

    def get(family: str, scan: bool) -> tuple[Path, Path]:
        if (family, scan) not in cache:
            root = tmp_path_factory.mktemp(f"single-{family}-{scan}")
            hf_to_maxtext(tiny_model(family, layers=3), root / "mt", scan=scan)
            maxtext_to_hf(root / "mt", root / "hf", shard_bytes=HF_SHARD)
            cache[family, scan] = (root / "mt", root / "hf")
        return cache[family, scan]

    return get


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_maxtext_in_parts_equals_single_process(tiny_model, singles, tmp_path, family, scan, n):
    """N parts + finalize restore (plain Orbax) to the single run's arrays, with the same output_digest; every
    part wrote a disjoint share into its own merged `ocdbt.process_<i>` and the staging folder is gone."""
    single, _ = singles(family, scan)
    out = tmp_path / "mt"
    found = in_parts(hf_to_maxtext, tiny_model(family, layers=3), out, n, scan=scan)
    assert_finished_maxtext(out, single, found, n)
    assert manifest(out)["options"] == manifest(single)["options"]


def test_recorded_output_digest_equals_the_one_recomputed_from_disk_gemma2(tiny_model, tmp_path):
    """The manifest's output_digest (from digests recorded while writing, which finalize relies on) equals
    `compute_output_digest(out)` recomputed from the stored chunks, also when an array has a zero-padding piece."""
    hf_to_maxtext(tiny_model("gemma2", layers=2), tmp_path / "mt", scan=True)
    assert manifest(tmp_path / "mt")["output_digest"] == compute_output_digest(tmp_path / "mt")


def test_padded_vocab_in_parts_equals_single_process_gemma2(tiny_model, tmp_path):
    """Gemma2 pads the embedding with zero rows: the blocks stay aligned to the stored chunks (padding shares a
    block with the last HF rows), so whichever parts get them, the finalized arrays equal the single run's (a chunk
    written by two parts would keep only one part's rows after the merge)."""
    src = tiny_model("gemma2", layers=2)
    hf_to_maxtext(src, tmp_path / "single", scan=True)
    for n in (2, 3):
        in_parts(hf_to_maxtext, src, tmp_path / f"mt{n}", n, scan=True)
        assert_same_arrays(tmp_path / "single", tmp_path / f"mt{n}")
        assert compute_output_digest(tmp_path / f"mt{n}") == compute_output_digest(tmp_path / "single")


@pytest.mark.parametrize("direction", ["maxtext", "hf"])
def test_without_hard_links_finalize_moves_the_parts_and_moves_them_back_when_it_fails(
    tiny_model, singles, tmp_path, monkeypatch, direction
):
    """On a file system without hard links (GCS FUSE) finalize moves the parts' files instead of copying them;
    when finalize then fails, every moved file goes back, so a second finalize succeeds with the same result."""
    single_mt, single_hf = singles("llama3.1", True)
    out = tmp_path / "out"
    if direction == "maxtext":
        fn, src, kw, single, convert = (
            hf_to_maxtext,
            tiny_model("llama3.1", layers=3),
            {"scan": True},
            single_mt,
            to_maxtext,
        )
    else:
        fn, src, kw, single, convert = maxtext_to_hf, single_mt, {"shard_bytes": HF_SHARD}, single_hf, to_hf
    for i in range(3):
        fn(src, out, part=(i, 3), **kw)
    before = {
        p.relative_to(shares.staging_dir(out)): p.stat().st_size
        for p in shares.staging_dir(out).rglob("*")
        if p.is_file()
    }

    def no_links(*a, **k):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    real = convert.write_manifest

    def fail(*a, **k):
        raise RuntimeError("injected failure after the parts were moved")

    monkeypatch.setattr(convert, "write_manifest", fail)
    with pytest.raises(RuntimeError, match="injected"):
        fn(src, out, finalize=True, **kw)
    assert not out.exists()
    after = {
        p.relative_to(shares.staging_dir(out)): p.stat().st_size
        for p in shares.staging_dir(out).rglob("*")
        if p.is_file()
    }
    assert after == before  # every part file is back where it was

    monkeypatch.setattr(convert, "write_manifest", real)
    fn(src, out, finalize=True, **kw)
    assert manifest(out)["output_digest"] == manifest(single)["output_digest"]
    assert not shares.staging_dir(out).exists()


@pytest.fixture(scope="module")
def midsize(tmp_path_factory):
    """The reliability suite's synthetic Llama (hidden 256, vocab 8192, 8 layers, 18 MB), in 3 MB shards."""
    from converters.tiny_models import tiny_config, write_synthetic_checkpoint

    cfg = tiny_config("llama3.1", layers=8, vocab=8192)
    cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("midsize") / "llama8", cfg, shard_bytes=3 << 20, seed=1)


def test_row_blocks_of_one_array_spread_over_parts(midsize, tmp_path, monkeypatch):
    """With small row blocks the embedding / lm_head are cut into blocks owned by different parts: an array is
    written by two processes into one stored array, and the merge still gives the single run's arrays."""
    monkeypatch.setattr(to_maxtext, "ROW_CHUNK_BYTES", 512 << 10)  # 4 MB embedding -> 8 row blocks
    hf_to_maxtext(midsize, tmp_path / "single", scan=True)
    found = in_parts(hf_to_maxtext, midsize, tmp_path / "mt", 3, scan=True)
    shared = {}
    for (name, _origin), ps in chunks_by_part(found).items():
        shared.setdefault(name, set()).update(ps)
    split = sorted(name for name, ps in shared.items() if len(ps) > 1)
    assert split, "no array was written by more than one part: the row-block split is not exercised"
    assert_finished_maxtext(tmp_path / "mt", tmp_path / "single", found, 3)


def test_a_part_reads_only_the_source_files_of_its_share(midsize, tmp_path, monkeypatch):
    """Part 0 of 3 never reads tensor data from the last shard, nor part 2 from the first; together they read them
    all."""
    import converters.io.safetensors as sio

    shards = sorted(p.name for p in midsize.glob("*.safetensors"))
    assert len(shards) >= 4
    real = sio.read_tensor
    read: dict[int, set] = {}

    for i in range(3):
        seen = read.setdefault(i, set())

        def spy(info, rows=None, seen=seen):
            seen.add(Path(info.path).name)
            return real(info, rows)

        monkeypatch.setattr(sio, "read_tensor", spy)
        hf_to_maxtext(midsize, tmp_path / "mt", scan=True, part=(i, 3))
    assert shards[-1] not in read[0], read[0]
    assert shards[0] not in read[2], read[2]
    assert read[0] and read[1] and read[2]
    assert set().union(*read.values()) == set(shards)
    last_of = {i: max(shards.index(f) for f in read[i]) for i in read}
    first_of = {i: min(shards.index(f) for f in read[i]) for i in read}
    assert last_of[0] <= first_of[1] and last_of[1] <= first_of[2], read  # contiguous runs of files


# ------------------------------------------------------------------------------------------ MaxText -> HF


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("scan", [True, False], ids=["from-scanned", "from-unscanned"])
@pytest.mark.parametrize("family", FAMILIES)
def test_maxtext_to_hf_in_parts_is_byte_identical(singles, tmp_path, family, scan, n):
    """Every file of the finalized export (shards, index, config) equals the single-process export byte for
    byte, with the same output_digest; each shard was written by exactly one part."""
    mt, single = singles(family, scan)
    out = tmp_path / "hf"
    found = in_parts(maxtext_to_hf, mt, out, n, shard_bytes=HF_SHARD)
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(out) == files(single)
    assert len([f for f in files(out) if f.endswith(".safetensors")]) >= 4
    for rel in files(out):
        if rel != MANIFEST:
            assert (out / rel).read_bytes() == (single / rel).read_bytes(), rel
    m, ms = manifest(out), manifest(single)
    for key in ("direction", "family", "options", "source", "outputs", "output_digest"):
        assert m[key] == ms[key], key
    assert m["output_digest"] == compute_output_digest(out)
    assert check_outputs(out) == []
    assert [p["part"] for p in m["parts"]] == list(range(n))
    written = [f for x in found for f in x["files"]]
    assert len(written) == len(set(written)) == len([f for f in files(out) if f.endswith(".safetensors")])
    if n > 1:
        assert all(x["files"] for x in found), "a part got no shard"
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------ finalize refuses


def cli(capsys, *args) -> tuple[int, str]:
    """`ckptflow ARGS` in this process: (exit code, the error lines on stderr)."""
    from converters.cli.main import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if "error:" in line]


DIRECTIONS = {
    # direction: (source fixture -> SRC, extra convert arguments)
    "maxtext": lambda tiny_model, singles: (tiny_model("llama3.1", layers=3), ["--to", "maxtext"]),
    "hf": lambda tiny_model, singles: (singles("llama3.1", True)[0], ["--to", "hf", "--shard-size", str(HF_SHARD)]),
}


def private_source(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(src, dst)  # copy2: same mtimes, so it is the same source until touched
    return dst


def assert_refused(capsys, src, out, args, says: list[str], keep: list[str]) -> None:
    """finalize exits 2 with one error line saying `says`, leaves OUT absent and keeps the parts `keep`."""
    code, err = cli(capsys, "convert", src, out, *args, "--finalize", "-q")
    assert code == 2, err
    assert len(err) == 1 and all(s in err[0] for s in says), err
    assert not out.exists()
    assert sorted(markers(out)) == sorted(keep)


@pytest.mark.parametrize("to", list(DIRECTIONS))
def test_finalize_refuses_a_missing_part(tiny_model, singles, tmp_path, capsys, to):
    """Part 1 of 3 never ran: finalize names it, writes nothing, keeps parts 0 and 2; once it runs, finalize works."""
    src, args = DIRECTIONS[to](tiny_model, singles)
    out = tmp_path / "out"
    for i in (0, 2):
        assert cli(capsys, "convert", src, out, *args, "--part", f"{i}/3", "-q") == (0, [])
    assert_refused(capsys, src, out, args, ["part(s) 1/3 not finished"], ["part-00000-of-00003", "part-00002-of-00003"])
    assert cli(capsys, "convert", src, out, *args, "--part", "1/3", "-q") == (0, [])
    assert cli(capsys, "convert", src, out, *args, "--finalize", "-q") == (0, [])
    assert check_outputs(out) == [] and leftovers(out) == []


@pytest.mark.parametrize("to", list(DIRECTIONS))
def test_finalize_refuses_parts_of_a_changed_source(tiny_model, singles, tmp_path, capsys, to):
    """A source file rewritten (new mtime) after the parts ran makes them stale: finalize refuses, keeps them."""
    src, args = DIRECTIONS[to](tiny_model, singles)
    src = private_source(src, tmp_path)
    out = tmp_path / "out"
    for i in range(3):
        assert cli(capsys, "convert", src, out, *args, "--part", f"{i}/3", "-q") == (0, [])
    victim = max((p for p in src.rglob("*") if p.is_file() and p.suffix != ".json"), key=lambda p: p.stat().st_size)
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert_refused(capsys, src, out, args, ["part 0/3 is stale"], [shares.share_name(i, 3) for i in range(3)])


@pytest.mark.parametrize(
    "to,other",
    [
        ("maxtext", ["--dtype", "float32"]),
        ("maxtext", ["--no-scan"]),
        ("hf", ["--dtype", "float32"]),
        ("hf", ["--shard-size", "80000"]),
    ],
)
def test_finalize_refuses_other_options_than_the_parts(tiny_model, singles, tmp_path, capsys, to, other):
    """finalize with options the parts were not run with (dtype, layout, shard size) is refused as stale."""
    src, args = DIRECTIONS[to](tiny_model, singles)
    out = tmp_path / "out"
    for i in range(3):
        assert cli(capsys, "convert", src, out, *args, "--part", f"{i}/3", "-q") == (0, [])
    assert_refused(
        capsys, src, out, [*args, *other], ["part 0/3 is stale"], [shares.share_name(i, 3) for i in range(3)]
    )


@pytest.mark.parametrize("to", list(DIRECTIONS))
def test_finalize_refuses_a_truncated_part_file(tiny_model, singles, tmp_path, capsys, to):
    """A file of part 1 cut short (a disk error, a bad copy): finalize names part 1 and the file, keeps the parts."""
    src, args = DIRECTIONS[to](tiny_model, singles)
    out = tmp_path / "out"
    for i in range(3):
        assert cli(capsys, "convert", src, out, *args, "--part", f"{i}/3", "-q") == (0, [])
    part1 = shares.staging_dir(out) / shares.share_name(1, 3)
    rel, meta = max(markers(out)[part1.name]["files"].items(), key=lambda kv: kv[1]["bytes"])
    os.truncate(part1 / rel, meta["bytes"] // 2)
    assert_refused(capsys, src, out, args, ["part 1/3", rel], [shares.share_name(i, 3) for i in range(3)])


@pytest.mark.parametrize("to", list(DIRECTIONS))
def test_finalize_refuses_a_part_written_by_another_version_and_a_new_part_run_replaces_it(
    tiny_model, singles, tmp_path, capsys, to
):
    """Part records changed format with the digests (v1: sha256, v2: BLAKE3; the two never mix in one digest): a v1
    part is refused by name, and running that part again replaces it."""
    src, args = DIRECTIONS[to](tiny_model, singles)
    out = tmp_path / "out"
    for i in range(3):
        assert cli(capsys, "convert", src, out, *args, "--part", f"{i}/3", "-q") == (0, [])
    record = shares.staging_dir(out) / shares.share_name(1, 3) / shares.RECORD
    old = json.loads(record.read_text())
    record.write_text(json.dumps({**old, "format": "ckptflow-part-v1"}))
    assert_refused(
        capsys,
        src,
        out,
        args,
        ["part 1/3 was written by another ckptflow version", "re-run it"],
        [shares.share_name(i, 3) for i in range(3)],
    )
    assert cli(capsys, "convert", src, out, *args, "--part", "1/3", "-q") == (0, [])
    assert cli(capsys, "convert", src, out, *args, "--finalize", "-q") == (0, [])
    assert check_outputs(out) == [] and leftovers(out) == []


def test_a_part_of_another_split_or_other_options_drops_the_old_parts(tiny_model, tmp_path, capsys):
    """Running part 0/2 after a 3-way split removes the 3-way parts (they can never be finalized with it); so does
    a part with other options; finalize then asks for the missing part of the new split."""
    src, out = tiny_model("llama3.1", layers=3), tmp_path / "out"
    for i in range(3):
        assert cli(capsys, "convert", src, out, "--to", "maxtext", "--part", f"{i}/3", "-q") == (0, [])
    assert cli(capsys, "convert", src, out, "--to", "maxtext", "--part", "0/2", "-q") == (0, [])
    assert sorted(markers(out)) == ["part-00000-of-00002"]
    assert sorted(p.name for p in shares.staging_dir(out).iterdir() if not p.name.startswith(".")) == [
        "part-00000-of-00002"
    ]
    assert_refused(capsys, src, out, ["--to", "maxtext"], ["part(s) 1/2 not finished"], ["part-00000-of-00002"])
    assert cli(capsys, "convert", src, out, "--to", "maxtext", "--dtype", "float32", "--part", "1/2", "-q") == (0, [])
    assert sorted(markers(out)) == ["part-00001-of-00002"]  # the bfloat16 part 0 is gone
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--no-ocdbt", "--pathways"])
def test_part_without_ocdbt_is_refused(tiny_model, tmp_path, capsys, flag):
    """Parts write Orbax's multi-process OCDBT layout: --no-ocdbt (or --pathways) with --part exits 2, writes
    nothing."""
    out = tmp_path / "out"
    code, err = cli(
        capsys, "convert", tiny_model("llama3.1", layers=3), out, "--to", "maxtext", flag, "--part", "0/2", "-q"
    )
    assert code == 2 and len(err) == 1 and "OCDBT" in err[0], err
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize(
    "args,says",
    [
        (["--part", "0/2", "--finalize"], "not allowed with argument"),
        (["--part", "3/3"], "0..N-1"),
        (["--part", "x"], "expected I/N"),
    ],
)
def test_bad_part_arguments_are_refused_by_argparse(tiny_model, tmp_path, capsys, args, says):
    """--part with --finalize, or an I/N out of range, is a usage error (exit 2) before any work."""
    out = tmp_path / "out"
    code, err = cli(capsys, "convert", tiny_model("llama3.1", layers=3), out, "--to", "maxtext", *args)
    assert code == 2 and err and says in err[-1], err
    assert not out.exists() and leftovers(out) == []

"""A split conversion (`convert --part I/N` x N, then `--finalize`) with one part SIGKILLed mid-write.

The three parts run at once as separate processes of the real command line on the 8-layer synthetic Llama.
Part 1 is killed when its hidden temp folder holds part of its share (located by what it has visibly
written, not by time). Then: finalize refuses (exit 2, naming part 1), OUT is absent and the finished parts
0 and 2 are kept; part 1 alone is run again (its killed temp folder is cleaned up), finalize succeeds, and
the result equals an uninterrupted single-process conversion (arrays / files and output_digest).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from converters.convert import shares
from converters.outputs.manifest import MANIFEST

POLL = 0.001
TIMEOUT = 180
HF_SHARD = 2 << 20  # --to hf: ~10 shards of the 18 MB model, so each of 3 parts writes several


def _part_temp(out: Path, i: int, n: int, pid: int) -> Path | None:
    """The temp folder process `pid` writes part i/n into (inside the staging folder)."""
    stage = shares.staging_dir(out)
    prefix = f".{shares.share_name(i, n)}.ckptflow-tmp-{pid}-"
    try:
        return next((p for p in stage.iterdir() if p.name.startswith(prefix)), None)
    except FileNotFoundError:
        return None


def _start(rel, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(rel.cli(*args), env=rel.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode(errors="replace")


def _kill_mid_write(rel, proc: subprocess.Popen, out: Path, i: int, n: int, threshold: int) -> str:
    """SIGKILL `proc` (part i/n) as soon as its temp folder holds `threshold` bytes; describe where it landed."""
    t0 = time.monotonic()
    while proc.poll() is None:
        assert time.monotonic() - t0 < TIMEOUT, f"part {i}/{n} still running after {TIMEOUT}s"
        tmp = _part_temp(out, i, n, proc.pid)
        if tmp is not None:
            held = rel.tree_bytes(tmp)
            if held >= threshold:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return f"{held} bytes in its temp folder at t={time.monotonic() - t0:.2f}s"
        time.sleep(POLL)
    rc, err = _finish(proc)
    pytest.fail(
        f"part {i}/{n} ended (rc {rc}) before holding {threshold} bytes: the kill point was missed. {err[-500:]}"
    )


@pytest.fixture(scope="module")
def references(synthetic_llama, tmp_path_factory):
    """Uninterrupted single-process conversions: HF -> MaxText (scanned), and that checkpoint -> HF in 2 MB shards."""
    from converters.convert import hf_to_maxtext, maxtext_to_hf

    root = tmp_path_factory.mktemp("kill-parts-ref")
    hf_to_maxtext(synthetic_llama, root / "mt", scan=True)
    maxtext_to_hf(root / "mt", root / "hf", shard_bytes=HF_SHARD)
    return root / "mt", root / "hf"


def _same_maxtext(a: Path, b: Path) -> None:
    from converters.io.orbax import read_params

    xa, xb = read_params(a), read_params(b)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        assert (xa[k].dtype, xa[k].shape) == (xb[k].dtype, xb[k].shape), k
        assert xa[k].tobytes() == xb[k].tobytes(), f"{k} differs"


def _same_hf(a: Path, b: Path) -> None:
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != MANIFEST)  # noqa: E731
    assert files(a) == files(b)
    for rel in files(a):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


CASES = {
    # name: (reference index: 0 MaxText, 1 HF; source: None = the HF model, else the reference MaxText; arguments)
    "hf-to-maxtext-scanned": (0, None, ["--to", "maxtext"]),
    "maxtext-to-hf": (1, 0, ["--to", "hf", "--shard-size", str(HF_SHARD)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_part_is_refused_then_rerun_and_the_result_equals_one_process(
    rel, references, synthetic_llama, tmp_path, case
):
    """Kill part 1 of 3 mid-write: finalize refuses and OUT stays absent; rerun part 1, finalize: same as one
    process."""
    ref_i, src_i, args = CASES[case]
    ref = references[ref_i]
    src = synthetic_llama if src_i is None else references[src_i]
    out = tmp_path / "out"
    n = 3
    total = sum(o["bytes"] for o in json.loads((ref / MANIFEST).read_text())["outputs"].values())

    procs = {i: _start(rel, ["convert", str(src), str(out), *args, "--part", f"{i}/{n}", "-q"]) for i in range(n)}
    landed = _kill_mid_write(rel, procs[1], out, 1, n, threshold=int(0.3 * total / n))
    assert procs[1].returncode == -signal.SIGKILL
    procs[1].stderr.close()
    for i in (0, 2):
        rc, err = _finish(procs[i])
        assert rc == 0, f"part {i}/{n} failed: {err[-1000:]}"
    stage = shares.staging_dir(out)
    assert sorted(p.name for p in stage.iterdir() if p.name.startswith("part-")) == [
        shares.share_name(0, n),
        shares.share_name(2, n),
    ]
    assert any(p.name.startswith(f".{shares.share_name(1, n)}.ckptflow-tmp-") for p in stage.iterdir()), (
        "the killed part left no temp folder?"
    )
    assert not out.exists()

    rc, err = _finish(_start(rel, ["convert", str(src), str(out), *args, "--finalize", "-q"]))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "part(s) 1/3 not finished" in errors[0], err[-1000:]
    assert not out.exists(), f"{out} exists after a refused finalize"
    assert (stage / shares.share_name(0, n) / shares.RECORD).is_file() and (
        stage / shares.share_name(2, n) / shares.RECORD
    ).is_file()

    rc, err = _finish(_start(rel, ["convert", str(src), str(out), *args, "--part", f"1/{n}", "-q"]))
    assert rc == 0, err[-1000:]
    assert not any(".ckptflow-tmp-" in p.name for p in stage.iterdir()), (
        "the killed part's temp folder was not cleaned up"
    )
    assert not out.exists()
    rc, err = _finish(_start(rel, ["convert", str(src), str(out), *args, "--finalize", "-q"]))
    assert rc == 0, err[-1000:]

    m = rel.check_complete(out)
    want = json.loads((ref / MANIFEST).read_text())
    assert m["output_digest"] == want["output_digest"]
    assert m["options"] == want["options"] and m["family"] == want["family"]
    assert [p["part"] for p in m["parts"]] == list(range(n))
    if ref_i == 0:
        _same_maxtext(ref, out)
        assert all((out / "0" / "items" / f"ocdbt.process_{i}").is_dir() for i in range(n))
    else:
        _same_hf(ref, out)
        assert m["outputs"] == want["outputs"]
    assert rel.siblings(out) == [], "staging folder, temp folders or lock left beside OUT"
    print(f"{case}: part 1 killed with {landed}")

"""Concurrent runs writing the same destination: one writes, the others wait for it and then see its result.

The lock is `converters.outputs.lock.destination_lock` (`flock` on `.NAME.ckptflow-lock` beside the destination),
held by `atomic_dir` and, in publish and download, from the look at the destination to the rename. To make
the runs overlap for certain, the test holds the lock itself while it starts them, waits until each says it
is waiting, then lets go.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from converters.outputs.atomic import atomic_dir
from converters.outputs.lock import destination_lock, lock_path


def start(rel, args: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "w")
    p = subprocess.Popen(rel.cli(*args), env=rel.child_env(), stdout=subprocess.PIPE, stderr=f, text=True)
    f.close()
    return p


def wait_for_text(log: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{log.name} never said {text!r}: {log.read_text()[-2000:]}")


def race(rel, tmp_path: Path, out: Path, commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """Start every command while holding `out`'s lock; release once all of them wait; (exit, stdout, stderr) each."""
    procs = []
    with destination_lock(out):
        for i, args in enumerate(commands):
            log = tmp_path / f"run{i}.err"
            procs.append((start(rel, args, log), log))
        for _, log in procs:
            wait_for_text(log, "waiting for it to finish")
    results = []
    for p, log in procs:
        stdout, _ = p.communicate(timeout=300)
        results.append((p.returncode, stdout, log.read_text()))
    return results


def test_lock_is_exclusive_reentrant_and_leaves_no_file(tmp_path):
    out = tmp_path / "dest"
    order = []

    def other():
        with destination_lock(out):
            order.append("other")

    with destination_lock(out):
        with destination_lock(out):  # re-entrant in the same thread
            t = threading.Thread(target=other)
            t.start()
            time.sleep(0.3)
            order.append("first")
            assert lock_path(out).exists()
    t.join(10)
    assert order == ["first", "other"]
    assert not lock_path(out).exists() and list(tmp_path.iterdir()) == []


def test_two_converts_to_one_destination_one_wins_the_other_refuses(rel, synthetic_llama, tmp_path):
    out = tmp_path / "mt"
    cmd = ["convert", str(synthetic_llama), str(out), "--to", "maxtext", "-q"]
    results = race(rel, tmp_path, out, [cmd, cmd])
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "already exists" in loser[2].splitlines()[-1]
    rel.check_complete(out)
    assert rel.siblings(out) == []


def test_two_converts_with_overwrite_both_finish_one_after_the_other(rel, synthetic_llama, tmp_path):
    out = tmp_path / "hf"
    from converters.convert import hf_to_maxtext

    hf_to_maxtext(synthetic_llama, tmp_path / "mt")
    cmd = ["convert", str(tmp_path / "mt"), str(out), "--to", "hf", "--overwrite", "-q"]
    results = race(rel, tmp_path, out, [cmd, cmd])
    assert [r[0] for r in results] == [0, 0], results
    rel.check_complete(out)
    assert rel.siblings(out) == []


@pytest.fixture(scope="module")
def two_versions(synthetic_llama, tmp_path_factory):
    """Two converted checkpoints of the same model (bfloat16 and float32): what publish takes."""
    from converters.convert import hf_to_maxtext

    root = tmp_path_factory.mktemp("versions")
    hf_to_maxtext(synthetic_llama, root / "bf16")
    hf_to_maxtext(synthetic_llama, root / "f32", dtype="float32")
    return root / "bf16", root / "f32"


def test_concurrent_publishes_of_one_version_publish_once(rel, two_versions, tmp_path):
    dest = tmp_path / "published" / "v1"
    cmd = ["publish", str(two_versions[0]), dest.as_uri(), "--json"]
    results = race(rel, tmp_path, dest, [cmd, cmd, cmd])
    assert [r[0] for r in results] == [0, 0, 0], results
    statuses = sorted(json.loads(r[1])["status"] for r in results)
    assert statuses == ["published", "unchanged", "unchanged"]
    rel.check_complete(dest)
    assert rel.siblings(dest) == []


def test_concurrent_publishes_of_different_versions_one_wins_the_other_is_refused(rel, two_versions, tmp_path):
    dest = tmp_path / "published" / "v1"
    results = race(rel, tmp_path, dest, [["publish", str(src), dest.as_uri()] for src in two_versions])
    assert sorted(r[0] for r in results) == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "already holds a different version" in loser[2]
    winner = two_versions[[r[0] for r in results].index(0)]
    published = rel.check_complete(dest)
    assert published["output_digest"] == json.loads((winner / "ckptflow-manifest.json").read_text())["output_digest"]
    assert rel.siblings(dest) == []


def test_concurrent_downloads_of_one_source_copy_once(rel, synthetic_llama, tmp_path):
    out = tmp_path / "staged"
    cmd = ["download", str(synthetic_llama), str(out)]
    results = race(rel, tmp_path, out, [cmd, cmd])
    assert [r[0] for r in results] == [0, 0], results
    verbs = sorted(r[1].split()[0] for r in results)
    assert verbs == ["already", "downloaded"], results
    assert rel.siblings(out) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_run_waiting_on_the_lock_can_be_killed_cleanly(rel, synthetic_llama, tmp_path, overwrite):
    """SIGTERM while waiting: the process ends, nothing written, the holder unaffected."""
    out = tmp_path / "mt"
    with destination_lock(out):
        log = tmp_path / "w.err"
        p = start(
            rel,
            [
                "convert",
                str(synthetic_llama),
                str(out),
                "--to",
                "maxtext",
                "-q",
                *(["--overwrite"] if overwrite else []),
            ],
            log,
        )
        wait_for_text(log, "waiting for it to finish")
        p.terminate()
        p.wait(30)
        assert p.returncode != 0 and not out.exists()
    assert rel.siblings(out) == []


def test_a_file_system_without_locks_still_converts(tmp_path, monkeypatch, capsys):
    """flock refused (ENOSYS/EOPNOTSUPP, as on some FUSE mounts): a warning, and the write goes ahead unlocked."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    out = tmp_path / "dest"
    with atomic_dir(out) as tmp:
        (tmp / "f").write_text("x")
    assert (out / "f").read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    assert "does not support file locks" in capsys.readouterr().err

"""`ckptflow convert` killed with SIGKILL at seeded points, in both directions, scanned and unscanned.

Each scenario runs the real command line as a child process on an 8-layer synthetic Llama (18 MB) and kills
it at points drawn from a seeded RNG, located by what the run has visibly done (so they do not depend on the
machine's speed):

* startup:   a time after launch before the temp folder appeared in the reference run (imports, validation);
* writing:   when the temp folder holds a drawn fraction (10-90 %) of the finished output's bytes;
* finishing: as soon as the manifest, the last file written, appears in the temp folder (just before the
             fsync and the rename that publishes the folder).

After every kill the destination is absent, or is exactly the previous complete version; the command is run
again (the next kill point interrupts that rerun, so leftovers of killed runs pile up) and a last rerun
completes. Its result equals an uninterrupted run: the same tensors, and the same manifest digest for every
file whose bytes are deterministic (all of an HF output; for Orbax see `assert_same_maxtext`).
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from converters.outputs.manifest import MANIFEST

SEED = 1010
POLL = 0.001

# Orbax files whose bytes differ between two identical saves: OCDBT data files get random names and hold
# arrays in completion order, OCDBT manifests point at them, commit markers and step metadata hold timestamps.
VOLATILE = re.compile(
    r"(^|/)(ocdbt\.process_\d+/|d/[0-9a-f]{32}$|manifest\.ocdbt$|commit_success\.txt$|_CHECKPOINT_METADATA$)"
)


@dataclass
class Run:
    returncode: int
    seconds: float
    killed_at: str = ""
    timeline: dict = field(default_factory=dict)  # event -> seconds after launch


def _temp(out: Path, pid: int) -> Path | None:
    """The temp folder of process `pid` (not the leftovers of runs killed before it)."""
    for p in out.parent.iterdir():
        if p.name.startswith(f".{out.name}.ckptflow-tmp-{pid}-"):
            return p
    return None


def run(rel, args: list[str], out: Path, kill: tuple | None = None, total_bytes: int = 0, timeout: float = 120) -> Run:
    """Run `ckptflow ARGS`; `kill` = ("startup", seconds) | ("writing", fraction) | ("finishing",)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(rel.cli(*args), env=rel.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    timeline: dict[str, float] = {}
    killed_at = ""
    try:
        while proc.poll() is None:
            now = time.monotonic() - t0
            assert now < timeout, f"{args} still running after {timeout}s"
            tmp = _temp(out, proc.pid)
            if tmp is not None:
                timeline.setdefault("temp", now)
                if (tmp / MANIFEST).exists():
                    timeline.setdefault("manifest", now)
            fire = False
            if kill is not None:
                kind = kill[0]
                if kind == "startup":
                    fire = now >= kill[1]
                elif kind == "writing":
                    fire = tmp is not None and rel.tree_bytes(tmp) >= kill[1] * total_bytes
                elif kind == "finishing":
                    fire = "manifest" in timeline
            if fire:
                proc.send_signal(signal.SIGKILL)
                killed_at = f"{kind} {kill[1]:.2f}" if len(kill) > 1 else kind
                killed_at += f" (t={now:.2f}s, temp {'present' if tmp else 'absent'})"
                proc.wait()
                break
            time.sleep(POLL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    seconds = time.monotonic() - t0
    if not killed_at:
        assert proc.returncode == 0, f"{args} failed ({proc.returncode}): {err[-2000:]}"
    return Run(proc.returncode, seconds, killed_at, timeline)


def arrays(path: Path) -> dict[str, np.ndarray]:
    from converters.io.orbax import read_params

    return read_params(path)


def assert_same_maxtext(a: Path, b: Path) -> None:
    """Same arrays (bytes, dtype, shape), same tree, same sidecars and same digests for every deterministic file."""
    ma, mb = json.loads((a / MANIFEST).read_text()), json.loads((b / MANIFEST).read_text())
    for key in (
        "direction",
        "family",
        "options",
        "source",
        "output_digest",
    ):  # output_digest: tensor-level, reproducible
        assert ma.get(key) == mb.get(key), key
    stable = lambda m: {k: v for k, v in m["outputs"].items() if not VOLATILE.search(k)}  # noqa: E731
    assert stable(ma) == stable(mb)
    assert "0/items/_METADATA" in stable(ma) and "ckptflow/hf/config.json" in stable(ma)
    xa, xb = arrays(a), arrays(b)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        assert xa[k].dtype == xb[k].dtype and xa[k].shape == xb[k].shape, k
        assert xa[k].tobytes() == xb[k].tobytes(), k
    meta = [json.loads((p / "0" / "_CHECKPOINT_METADATA").read_text()) for p in (a, b)]
    for m in meta:
        for k in [k for k in m if "timestamp" in k]:
            del m[k]
    assert meta[0] == meta[1]


def assert_same_hf(a: Path, b: Path) -> None:
    """An HF output is byte-deterministic: every manifest entry (size and BLAKE3) is equal."""
    ma, mb = json.loads((a / MANIFEST).read_text()), json.loads((b / MANIFEST).read_text())
    for key in ("direction", "family", "options", "source", "outputs", "output_digest"):
        assert ma.get(key) == mb.get(key), key


@pytest.fixture(scope="module")
def references(rel, synthetic_llama, tmp_path_factory):
    """Uninterrupted runs: scanned and unscanned MaxText, and HF from each; with their timelines."""
    root = tmp_path_factory.mktemp("reference")
    refs = {}
    for name, args in {
        "mt-scan": ["convert", str(synthetic_llama), str(root / "mt-scan"), "--to", "maxtext", "-q"],
        "mt-noscan": ["convert", str(synthetic_llama), str(root / "mt-noscan"), "--to", "maxtext", "--no-scan", "-q"],
        "hf-from-scan": ["convert", str(root / "mt-scan"), str(root / "hf-from-scan"), "--to", "hf", "-q"],
        "hf-from-noscan": ["convert", str(root / "mt-noscan"), str(root / "hf-from-noscan"), "--to", "hf", "-q"],
    }.items():
        r = run(rel, args, root / name)
        manifest = rel.check_complete(root / name)
        refs[name] = (root / name, r, sum(o["bytes"] for o in manifest["outputs"].values()))
    return refs


SCENARIOS = {
    # name: (reference, convert arguments after SRC OUT, source reference or None for the HF model, kill kinds, previous
    # version)
    "hf-to-maxtext-scanned-over-previous": (
        "mt-scan",
        ["--to", "maxtext"],
        None,
        ["startup", "writing", "writing", "finishing"],
        True,
    ),
    "hf-to-maxtext-unscanned": (
        "mt-noscan",
        ["--to", "maxtext", "--no-scan"],
        None,
        ["writing", "writing", "finishing"],
        False,
    ),
    "maxtext-scanned-to-hf": ("hf-from-scan", ["--to", "hf"], "mt-scan", ["startup", "writing", "writing"], False),
    "maxtext-unscanned-to-hf": ("hf-from-noscan", ["--to", "hf"], "mt-noscan", ["writing", "finishing"], False),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sigkill_leaves_nothing_that_looks_finished_and_a_rerun_matches(
    rel, references, synthetic_llama, tmp_path, scenario, record_property
):
    ref_name, extra, src_name, kinds, previous = SCENARIOS[scenario]
    ref_dir, ref_run, total = references[ref_name]
    src = references[src_name][0] if src_name else synthetic_llama
    out = tmp_path / "out"
    args = ["convert", str(src), str(out), *extra, "--overwrite", "-q"]  # --overwrite: the DAG's convert command

    before = None
    if previous:  # the destination already holds a complete, different version (float32 weights)
        run(rel, ["convert", str(src), str(out), *extra, "--dtype", "float32", "-q"], out)
        before = rel.check_complete(out)

    rng = random.Random(f"{SEED}-{scenario}")
    landed = []
    for kind in kinds:
        if kind == "startup":
            kill = ("startup", rng.uniform(0.2, 0.9) * ref_run.timeline["temp"])
        elif kind == "writing":
            kill = ("writing", rng.uniform(0.1, 0.9))
        else:
            kill = ("finishing",)
        r = run(rel, args, out, kill=kill, total_bytes=total)
        if r.killed_at:
            assert r.returncode == -signal.SIGKILL
            landed.append(r.killed_at)
        # Never something that looks finished: absent, or exactly the previous complete version.
        if before is not None:
            assert rel.check_complete(out)["outputs"] == before["outputs"], r.killed_at
        elif r.killed_at:
            assert not out.exists(), (
                f"{out} exists after a kill at {r.killed_at}: {sorted(p.name for p in out.iterdir())}"
            )
        else:  # finished before the kill point came: complete
            rel.check_complete(out)

    final = run(rel, args, out)
    rel.check_complete(out)
    (assert_same_hf if ref_name.startswith("hf") else assert_same_maxtext)(ref_dir, out)
    assert rel.siblings(out) == []  # temp folders of the killed runs and their lock file are gone
    assert len(landed) >= len(kinds) - 1, f"kill points missed: {landed}"
    record_property("kill_points", landed)
    print(
        f"{scenario}: reference {ref_run.seconds:.2f}s (temp at {ref_run.timeline.get('temp', 0):.2f}s), "
        f"rerun {final.seconds:.2f}s, killed at: {'; '.join(landed)}"
    )

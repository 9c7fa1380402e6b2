"""Disk full while writing: a small tmpfs (8 MB) as the destination's file system, outputs of ~18 MB.

Every writing command ends with one `error:` line naming the cause (exit status 2), the destination does not
exist, no temp folder or lock file is left, and the space is given back.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid

import pytest

SIZE_MB = 8


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small tmpfs")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", f"ckptflow-test-{uuid.uuid4().hex[:6]}", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(
            f"mounting a {SIZE_MB} MB tmpfs is not permitted here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}"
        )
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="module")
def synthetic_maxtext(synthetic_llama, tmp_path_factory):
    from converters.convert import hf_to_maxtext

    out = tmp_path_factory.mktemp("disk-full") / "mt"
    hf_to_maxtext(synthetic_llama, out)
    return out


def _assert_clean_failure(rel, r, mnt, out):
    lines = [line for line in r.stderr.splitlines() if line.strip()]  # progress bar redraws, then the error
    errors = [line for line in lines if line.startswith("error:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], r.stderr[-3000:]
    assert errors[0].startswith("error: no space left on the device") and "nothing was written" in errors[0]
    assert "Traceback" not in r.stderr and "absl" not in r.stderr
    assert not out.exists()
    assert list(mnt.iterdir()) == []  # no temp folder, no lock file
    assert shutil.disk_usage(mnt).used < 1 << 20  # the partial output's space is back


@pytest.mark.parametrize("case", ["hf-to-maxtext", "maxtext-to-hf", "publish", "download"])
def test_disk_full_is_one_clear_error_and_leaves_nothing(rel, small_disk, synthetic_llama, synthetic_maxtext, case):
    out = small_disk / "out"
    args = {
        "hf-to-maxtext": ["convert", str(synthetic_llama), str(out), "--to", "maxtext"],
        "maxtext-to-hf": ["convert", str(synthetic_maxtext), str(out), "--to", "hf"],
        "publish": ["publish", str(synthetic_maxtext), out.as_uri()],
        "download": ["download", str(synthetic_llama), str(out)],
    }[case]
    r = subprocess.run(rel.cli(*args), env=rel.child_env(), capture_output=True, text=True, timeout=300)
    _assert_clean_failure(rel, r, small_disk, out)

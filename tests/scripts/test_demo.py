"""`make demo`'s body (scripts/demo.py) end to end: the whole DAG on the embedded default, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_the_pipeline_and_publishes_a_verified_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("AIRFLOW_HOME", None)
    p = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(tmp_path / "demo")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for task in ("plan_parts", "download[0]", "download_finalize", "convert[0]", "finalize", "verify", "publish"):
        assert any(line.split()[:2] == [task, "success"] for line in p.stdout.splitlines()), (task, p.stdout)
    published = tmp_path / "demo" / "published" / "llama3.1-tiny" / "maxtext-scanned"
    manifest = json.loads((published / "ckptflow-manifest.json").read_text())
    assert manifest["direction"] == "hf->maxtext" and manifest["verify"]["passed"] is True
    assert (published / "0" / "items" / "_METADATA").is_file()

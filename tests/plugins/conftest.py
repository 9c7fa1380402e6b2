"""The Checkpoints UI plugin suites: a throwaway Airflow home (set up before Airflow is imported), the plugins
folder on sys.path, and real runs of the `convert_checkpoint` DAG to show."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.airflow_fixtures import airflow_db, convert_dag, isolated_runs  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[2]
PLUGINS = REPO / "plugins"
for _path in (PLUGINS, Path(__file__).resolve().parent):  # ckptflow_ui, and chromium_cdp (helpers)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


@dataclass
class ConversionRuns:
    """Two real runs of `convert_checkpoint` in local mode: one published, one stopped by verification."""

    published: object  # DagRun: tiny Qwen3, HF -> MaxText scanned, float32
    verify_failed: object  # DagRun: tiny float32 Llama 3.1 -> MaxText unscanned bfloat16, max_kl 1e-7
    published_dest: Path
    failed_dest: Path
    work_root: Path

    def run_dir(self, dag_run) -> Path:
        from operators.commands import WorkLayout

        return Path(WorkLayout.for_run(str(self.work_root), dag_run.dag_id, dag_run.run_id).root)


@pytest.fixture(scope="session")
def conversion_runs(convert_dag, tiny_model, tmp_path_factory) -> ConversionRuns:  # noqa: F811
    root = tmp_path_factory.mktemp("checkpoints-ui")
    work = root / "work"
    published_dest = root / "published" / "qwen3-tiny" / "v1"
    failed_dest = root / "published" / "llama3.1-tiny" / "v1"
    with pytest.MonkeyPatch.context() as mp:
        # Only while the runs execute: the page must find each run's files from the database afterwards.
        mp.setenv("CKPTFLOW_WORK_ROOT", str(work))
        published = convert_dag.test(
            run_conf={"source": str(tiny_model("qwen3")), "destination": published_dest.as_uri(), "dtype": "float32"}
        )
        verify_failed = convert_dag.test(
            run_conf={
                # A float32 model written as bfloat16 measures a KL of ~2e-5: far above this strict threshold
                # (a bf16 model converts bit-exactly, KL ~1e-13, so it cannot be made to fail this way).
                "source": str(tiny_model("llama3.1", dtype="float32")),
                "destination": failed_dest.as_uri(),
                "scan": False,
                "dtype": "bfloat16",
                "max_kl": 1e-7,
            }
        )
    assert published.state == "success", {ti.task_id: ti.state for ti in published.get_task_instances()}
    states = {ti.task_id: ti.state for ti in verify_failed.get_task_instances()}
    assert verify_failed.state == "failed" and states["verify"] == "failed", states
    return ConversionRuns(published, verify_failed, published_dest, failed_dest, work)

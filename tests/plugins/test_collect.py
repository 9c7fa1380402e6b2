"""`ckptflow_ui.collect` on hand-made records: what each column is made of, for sources and work volumes the
local test runs cannot produce (hub repos resolved to a sha, a kubernetes PVC, a GCS FUSE bucket), and runs in
parts (one task instance per part of download and convert)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ckptflow_ui.collect import (
    ConversionCache,
    EventRecord,
    RunRecord,
    StepRecord,
    WorkFiles,
    build_conversion,
    dag_ids_from_env,
    filter_conversions,
    lineage_manifest,
)

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=timezone.utc)
SHA = "0123456789abcdef0123456789abcdef01234567"


def record(conf, states, events=(), run_state="success", end=T0 + timedelta(minutes=42)) -> RunRecord:
    """`states`: task id -> (state, tries), or a list of them: one task instance per part (map index 0, 1, ...);
    part I starts I seconds after T0 and, unless still under way, ends 1 + I minutes after it."""

    def ti(name, st, tries, i, map_index):
        ended = None if st in ("running", "up_for_retry", "queued", None) else T0 + timedelta(minutes=1 + i)
        return StepRecord(name, st, tries, T0 + timedelta(seconds=i), ended, map_index)

    steps = {
        name: tuple(
            ti(name, st, tries, i, i if isinstance(value, list) else -1)
            for i, (st, tries) in enumerate(value if isinstance(value, list) else [value])
        )
        for name, value in states.items()
    }
    return RunRecord(
        "convert_checkpoint", "manual__2026-11-01T09:00:00+00:00", run_state, T0, end, T0, conf, steps, tuple(events)
    )


HUB_CONF = {
    "source": "meta-llama/Llama-3.1-8B",
    "revision": "main",
    "model": "llama3.1-8b",
    "destination": "file:///models/llama3.1-8b/v1",
    "execution_mode": "kubernetes",
    "scan": False,
}
ALL_OK = {s: ("success", 1) for s in ("download", "convert", "verify", "publish")}


def write_run(folder: Path, *, passed=True, sha=SHA):
    (folder / "source").mkdir(parents=True)
    (folder / "converted").mkdir()
    (folder / "verify").mkdir()
    (folder / "source" / "ckptflow-download.json").write_text(
        json.dumps({"revision": sha, "digest": "sha256:" + "a" * 64})
    )
    (folder / "converted" / "ckptflow-manifest.json").write_text(
        json.dumps(
            {
                "family": "llama3.1",
                "options": {"scan_layers": False, "dtype": "bfloat16"},
                "outputs": {
                    "0/items/a": {"bytes": 1000, "sha256": "b" * 64},
                    "0/items/b": {"bytes": 24, "sha256": "c" * 64},
                },
            }
        )
    )
    summary = {
        "passed": passed,
        "kl_max": 0.5 if not passed else 1e-4,
        "kl_mean": 1e-5,
        "max_kl_threshold": 0.015,
        "num_tokens": 512,
    }
    (folder / "verify" / "verify.json").write_text(
        json.dumps({"summary": summary, "dtype": "float32", "max_kl": 0.015})
    )
    (folder / "verify" / "kl_per_token.png").write_bytes(b"\x89PNG fake")
    (folder / "verify" / "verify.md").write_text("# ckptflow verify\n")


def test_hub_source_on_a_pvc_work_volume_mounted_in_the_api_server(tmp_path):
    # The pods wrote under /ckptflow-work on PVC `ckptflow-work`; the API server mounts it at tmp_path/mnt.
    key = "convert_checkpoint/manual__2026-11-01T09_00_00_00_00-1234abcd"
    write_run(tmp_path / "mnt" / key)
    events = [
        EventRecord("download", f"pvc://ckptflow-work/{key}/source", {"source_revision_sha": SHA}, T0),
        EventRecord("convert", f"pvc://ckptflow-work/{key}/converted", {"family": "llama3.1"}, T0),
        EventRecord("verify", f"pvc://ckptflow-work/{key}/verify", {}, T0),
        EventRecord(
            "publish",
            "file:///models/llama3.1-8b/v1",
            {
                "destination": "file:///models/llama3.1-8b/v1",
                "publish_status": "published",
                "published_digest": "sha256:" + "d" * 64,
            },
            T0,
        ),
    ]
    c = build_conversion(record(HUB_CONF, ALL_OK, events), WorkFiles(pvc_mount=str(tmp_path / "mnt")))
    assert c.status == "published" and c.verify_label == "passed"
    assert (c.model, c.family, c.source, c.revision, c.revision_sha) == (
        "llama3.1-8b",
        "llama3.1",
        "meta-llama/Llama-3.1-8B",
        "main",
        SHA,
    )
    assert not c.source_is_local and c.execution_mode == "kubernetes"
    assert (c.direction, c.layout, c.dtype) == ("hf-to-maxtext", "unscanned", "bfloat16")
    assert c.size_bytes == 1024 and c.files == 2 and c.duration_seconds == 42 * 60
    assert c.has_plot and c.has_report and c.has_manifest
    assert c.work_folder == str(tmp_path / "mnt" / key)
    assert c.destination == "file:///models/llama3.1-8b/v1" and c.output_digest == "sha256:" + "d" * 64


def test_without_the_work_folder_the_database_still_gives_the_row():
    # A PVC the API server does not mount: everything comes from the asset events' extras.
    events = [
        EventRecord(
            "download",
            "pvc://ckptflow-work/k/source",
            {"source_revision_sha": SHA, "source_digest": "sha256:" + "e" * 64},
            T0,
        ),
        EventRecord(
            "publish",
            "file:///models/x",
            {
                "family": "llama3.1",
                "layout": "unscanned",
                "dtype": "bfloat16",
                "destination": "file:///models/x",
                "verify": {"passed": True, "kl_max": 2e-4, "kl_mean": 3e-5, "max_kl_threshold": 0.015},
            },
            T0,
        ),
    ]
    c = build_conversion(record(HUB_CONF, ALL_OK, events), WorkFiles())
    assert c.work_folder is None and not c.has_plot and c.size_bytes is None
    assert c.revision_sha == SHA and c.source_digest == "sha256:" + "e" * 64
    assert c.verify["kl_max"] == 2e-4 and c.verify_label == "passed" and c.layout == "unscanned"


class FakeGCS:
    """The part of gcsfs the page uses, over a dict of objects."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects

    def open(self, path, mode="rb"):
        import io

        if path not in self.objects:
            raise FileNotFoundError(path)
        return io.BytesIO(self.objects[path])

    def exists(self, path):
        return path in self.objects


def test_gcs_fuse_work_volume_is_read_through_gcsfs():
    base = "gs://ckpt-work/runs/convert_checkpoint/k"
    fs = FakeGCS(
        {
            f"{base}/verify/verify.json": json.dumps(
                {"summary": {"passed": False, "kl_max": 0.4, "kl_mean": 0.1, "max_kl_threshold": 0.015}}
            ).encode(),
            f"{base}/verify/kl_per_token.png": b"\x89PNG",
        }
    )
    events = [EventRecord("convert", f"{base}/converted", {"family": "qwen3"}, T0)]
    states = {
        "download": ("success", 1),
        "convert": ("success", 2),
        "verify": ("failed", 1),
        "publish": ("upstream_failed", 0),
    }
    c = build_conversion(
        record({**HUB_CONF, "model": "auto"}, states, events, run_state="failed"), WorkFiles(gcs_filesystem=fs)
    )
    assert c.status == "verify-failed" and c.failed_step == "verify" and c.verify_label == "failed"
    assert c.model == "qwen3" and c.verify["kl_max"] == 0.4 and c.has_plot and not c.has_report
    assert [s.try_number for s in c.steps] == [1, 2, 1, 0]


def test_statuses():
    files = WorkFiles()
    running = build_conversion(
        record(HUB_CONF, {"download": ("running", 1)}, run_state="running", end=None),
        files,
        now=T0 + timedelta(seconds=90),
    )
    assert running.status == "running" and running.duration_seconds == 90 and running.verify_label == "running"
    failed = build_conversion(record(HUB_CONF, {"download": ("failed", 4)}, run_state="failed"), files)
    assert failed.status == "failed" and failed.failed_step == "download" and failed.verify_label == "not run"
    assert filter_conversions([running, failed], status="failed") == [failed]
    assert filter_conversions([running, failed], model="llama3.1-8b", status="running") == [running]
    assert filter_conversions([running, failed], model="qwen3") == []


def test_cache_keeps_finished_runs_until_they_change(tmp_path):
    write_run(tmp_path / "r")
    events = [EventRecord("download", (tmp_path / "r" / "source").as_uri(), {}, T0)]
    run = record(HUB_CONF, ALL_OK, events)
    cache = ConversionCache()
    first = cache.get(run, WorkFiles())
    (tmp_path / "r" / "verify" / "kl_per_token.png").unlink()
    assert cache.get(run, WorkFiles()) is first  # finished and unchanged: not read again
    rerun = record(HUB_CONF, {**ALL_OK, "verify": ("success", 2)}, events)
    assert cache.get(rerun, WorkFiles()).has_plot is False  # cleared and re-run: read again


def test_lineage_manifest_gathers_events_and_result_files(tmp_path):
    write_run(tmp_path / "r")
    events = [EventRecord("download", (tmp_path / "r" / "source").as_uri(), {"source_revision_sha": SHA}, T0)]
    doc = lineage_manifest(record(HUB_CONF, ALL_OK, events), WorkFiles())
    assert doc["kind"] == "ckptflow-lineage" and doc["params"] == HUB_CONF
    assert [s["step"] for s in doc["steps"]] == ["download", "convert", "verify", "publish"]
    assert doc["steps"][0]["asset_events"][0]["extra"]["source_revision_sha"] == SHA
    assert doc["download"]["revision"] == SHA and doc["convert_manifest"]["family"] == "llama3.1"
    assert doc["verify_summary"]["passed"] is True


def test_dag_ids_setting():
    assert dag_ids_from_env({}) == ("convert_checkpoint",)
    assert dag_ids_from_env({"CKPTFLOW_UI_DAG_IDS": "a, b,,"}) == ("a", "b")


# ------------------------------------------------------------------------------------------- runs in parts

PARTS_CONF = {**HUB_CONF, "parts": 3}
PARTS_OK = {
    "plan_parts": ("success", 1),
    "download": [("success", 1)] * 3,
    "download_finalize": ("success", 1),
    "convert": [("success", 1), ("success", 2), ("success", 1)],
    "finalize": ("success", 1),
    "verify": ("success", 1),
    "publish": ("success", 1),
}


def test_a_run_in_parts_shows_each_step_summed_up_over_its_parts(tmp_path):
    # The staged source's and the checkpoint's events come from the finalizes: the work folder is found from them.
    key = "convert_checkpoint/k-in-parts"
    write_run(tmp_path / "mnt" / key)
    events = [
        EventRecord(
            "download_finalize", f"pvc://ckptflow-work/{key}/source", {"source_revision_sha": SHA, "parts": 3}, T0
        ),
        EventRecord("finalize", f"pvc://ckptflow-work/{key}/converted", {"family": "llama3.1", "parts": 3}, T0),
    ]
    c = build_conversion(record(PARTS_CONF, PARTS_OK, events), WorkFiles(pvc_mount=str(tmp_path / "mnt")))
    assert c.work_folder == str(tmp_path / "mnt" / key) and c.has_plot and c.revision_sha == SHA
    assert c.status == "published" and c.failed_step is None
    assert [s.task_id for s in c.steps] == list(PARTS_OK)  # plan_parts and both finalizes listed, in pipeline order
    steps = {s.task_id: s for s in c.steps}
    assert steps["convert"].summary == "convert: 3/3 parts done, 1 retried"
    assert (steps["convert"].state, steps["convert"].try_number, steps["convert"].parts) == ("success", 2, 3)
    assert steps["download"].summary == "download: 3/3 parts done" and steps["finalize"].summary == "finalize: success"
    assert steps["convert"].seconds == 180  # from the first part's start to the last part's end
    assert [s.note for s in c.steps if s.note] == ["download: 3/3 parts done", "convert: 3/3 parts done, 1 retried"]
    assert {s["task_id"]: s["summary"] for s in c.to_dict()["steps"]}["convert"] == "convert: 3/3 parts done, 1 retried"

    doc = lineage_manifest(record(PARTS_CONF, PARTS_OK, events), WorkFiles(pvc_mount=str(tmp_path / "mnt")))
    by_step = {s["step"]: s for s in doc["steps"]}
    assert list(by_step) == list(PARTS_OK)
    assert (by_step["convert"]["parts"], by_step["convert"]["parts_done"], by_step["convert"]["parts_retried"]) == (
        3,
        3,
        1,
    )
    assert by_step["download_finalize"]["asset_events"][0]["extra"]["source_revision_sha"] == SHA
    assert "parts" not in by_step["verify"]


def test_the_worst_part_decides_a_steps_state():
    # Keyed by task id alone, the last part (a success) would hide the failed one.
    failed = {
        **PARTS_OK,
        "convert": [("success", 1), ("failed", 4), ("success", 1)],
        "finalize": ("upstream_failed", 0),
        "verify": ("upstream_failed", 0),
        "publish": ("upstream_failed", 0),
    }
    c = build_conversion(record(PARTS_CONF, failed, run_state="failed"), WorkFiles())
    assert c.status == "failed" and c.failed_step == "convert"
    convert = next(s for s in c.steps if s.task_id == "convert")
    assert convert.state == "failed" and convert.summary == "convert: 2/3 parts done, 1 retried (failed)"

    running = {"plan_parts": ("success", 1), "download": [("success", 1), ("up_for_retry", 1), ("running", 1)]}
    c = build_conversion(
        record(PARTS_CONF, running, run_state="running", end=None), WorkFiles(), now=T0 + timedelta(minutes=5)
    )
    download = next(s for s in c.steps if s.task_id == "download")
    assert c.status == "running" and download.state == "up_for_retry" and download.seconds == 300
    assert download.summary == "download: 1/3 parts done (up_for_retry)"
    waiting = {"download": [("success", 1), (None, 0), ("running", 1)]}
    c = build_conversion(record(PARTS_CONF, waiting, run_state="running", end=None), WorkFiles())
    assert next(s for s in c.steps if s.task_id == "download").state == "running"


def test_parts_dropped_by_a_rerun_and_runs_in_one_part():
    # A run cleared and re-run with fewer parts keeps the dropped task instances as "removed": not counted.
    states = {**PARTS_OK, "convert": [("success", 1), ("success", 1), ("removed", 1)]}
    c = build_conversion(record({**PARTS_CONF, "parts": 2}, states), WorkFiles())
    assert next(s for s in c.steps if s.task_id == "convert").summary == "convert: 2/2 parts done"
    # One part: the mapped steps have one task instance and the finalizes do nothing; the page is as it always was.
    one = {
        "plan_parts": ("success", 1),
        "download": [("success", 1)],
        "download_finalize": ("success", 1),
        "convert": [("success", 2)],
        "finalize": ("success", 1),
        "verify": ("success", 1),
        "publish": ("success", 1),
    }
    c = build_conversion(record(HUB_CONF, one), WorkFiles())
    assert [s.task_id for s in c.steps] == ["download", "convert", "verify", "publish"]
    assert [s.summary for s in c.steps][1] == "convert: success (try 2)" and [s.note for s in c.steps if s.note] == [
        "convert: 2 tries"
    ]


def test_the_page_shows_a_step_in_parts():
    """The page's template with a run in parts: each step's square titled with its summary, the parts under the
    duration."""
    from ckptflow_ui.app import _env
    from ckptflow_ui.collect import STATUSES

    c = build_conversion(record(PARTS_CONF, PARTS_OK), WorkFiles())
    html = _env.get_template("checkpoints.html").render(
        rows=[{"c": c, "q": "", "dag_run_href": "#", "status_label": "Published"}],
        models=[],
        statuses=STATUSES,
        selected_model="",
        selected_status="",
        counts={},
        total=1,
        limit=200,
        dag_ids=("convert_checkpoint",),
        generated=T0,
    )
    assert html.count('class="step st-success"') == 7
    assert 'title="convert: 3/3 parts done, 1 retried"' in html and 'title="download_finalize: success"' in html
    assert '<div class="small">convert: 3/3 parts done, 1 retried</div>' in html

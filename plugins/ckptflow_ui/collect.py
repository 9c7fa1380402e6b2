"""Every conversion at a glance: one `Conversion` per DAG run, from Airflow's metadata database and the run's
work folder.

What comes from where:

* the metadata database (always there): the DAG run (state, times, the params it was triggered with), its
  task instances (state and tries of download/convert/verify/publish; for a run in parts also plan_parts and the
  finalize tasks, and one instance per part of download and convert, summed up per step) and the asset events the
  steps emitted,
  whose extras carry the resolved source revision sha, the layout, the verify metrics, the output digest and
  the destination (see `operators.lineage.extras`);
* the run's work folder, when the API server can read it: the steps' result files
  (`source/ckptflow-download.json`, `converted/ckptflow-manifest.json`, `verify/verify.json`, `publish.json`),
  which add what the events cannot (the verdict of a verification that failed, sizes) and the per-token KL
  plot. The folder is found from the URIs of the run's asset events (`file://...`, `gs://...` for a GCS FUSE
  work volume, `pvc://claim/...` mapped through `CKPTFLOW_UI_WORK_MOUNT`), so it does not matter which work
  root was configured when the run executed; runs without events fall back to the configured layout.

Nothing here imports Airflow at module import; `load_runs` does, when called in the API server.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from converters.core.direction import Direction
from operators.commands import (
    CONVERT_MANIFEST,
    DOWNLOAD_FINALIZE,
    DOWNLOAD_MANIFEST,
    FINALIZE,
    VERIFY_REPORT,
    RunSpec,
    WorkLayout,
)
from operators.lineage import verify_metrics

DEFAULT_DAG_IDS = ("convert_checkpoint",)
PLOT_NAME = "kl_per_token.png"
REPORT_NAME = "verify.md"
PUBLISH_RECEIPT = "publish.json"

# Overall status of a conversion, for the status filter (value -> label), in display order.
STATUSES = {
    "published": "Published",
    "verify-failed": "Verify failed",
    "failed": "Failed",
    "running": "Running",
}
_RUNNING_STATES = ("queued", "running", "restarting", "up_for_retry", "up_for_reschedule", "scheduled", "deferred")
# The `convert_checkpoint` tasks in pipeline order. With one part, plan_parts and the finalize tasks do nothing, so
# the page lists them only for a run in parts.
TASKS = ("plan_parts", "download", DOWNLOAD_FINALIZE, "convert", FINALIZE, "verify", "publish")
_PARTS_ONLY = ("plan_parts", DOWNLOAD_FINALIZE, FINALIZE)
# The state a step in parts shows is its worst part's: a failed part fails the step, a running one keeps it running.
_WORST_FIRST = (
    "failed",
    "upstream_failed",
    "up_for_retry",
    "restarting",
    "running",
    "deferred",
    "up_for_reschedule",
    "queued",
    "scheduled",
    None,
    "skipped",
    "success",
)


# ------------------------------------------------------------------------------------------- settings


def dag_ids_from_env(env: dict[str, str] | None = None) -> tuple[str, ...]:
    """DAGs whose runs are conversions: `CKPTFLOW_UI_DAG_IDS` (comma-separated), else `convert_checkpoint`."""
    raw = (os.environ if env is None else env).get("CKPTFLOW_UI_DAG_IDS", "")
    ids = tuple(x.strip() for x in raw.split(",") if x.strip())
    return ids or DEFAULT_DAG_IDS


# --------------------------------------------------------------------------------------- raw records


@dataclass(frozen=True)
class StepRecord:
    task_id: str
    state: str | None
    try_number: int
    start: datetime | None
    end: datetime | None
    map_index: int = -1  # the part a task instance of a mapped step runs


@dataclass(frozen=True)
class EventRecord:
    task_id: str | None
    uri: str
    extra: dict
    timestamp: datetime | None


@dataclass(frozen=True)
class RunRecord:
    """A DAG run as read from the metadata database."""

    dag_id: str
    run_id: str
    state: str | None
    start: datetime | None
    end: datetime | None
    queued: datetime | None
    conf: dict
    steps: dict[str, tuple[StepRecord, ...]]  # task id -> its task instances (one per part of a mapped step)
    events: tuple[EventRecord, ...]

    def fingerprint(self) -> tuple:
        return (
            self.state,
            self.end,
            tuple(sorted((s.task_id, s.map_index, s.state, s.try_number) for tis in self.steps.values() for s in tis)),
            len(self.events),
        )


def _state(value) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))


def load_runs(
    dag_ids: tuple[str, ...] | list[str],
    *,
    limit: int = 200,
    readable_dag_ids: set[str] | None = None,
    run_id: str | None = None,
    session=None,
) -> list[RunRecord]:
    """The newest `limit` runs of `dag_ids` (only those in `readable_dag_ids` when given; only `run_id` when
    given), newest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    ids = [d for d in dag_ids if readable_dag_ids is None or d in readable_dag_ids]
    if not ids:
        return []
    if session is None:
        with create_session() as own:
            return load_runs(ids, limit=limit, run_id=run_id, session=own)

    query = select(DagRun).where(DagRun.dag_id.in_(ids))
    if run_id is not None:
        query = query.where(DagRun.run_id == run_id)
    runs = session.scalars(query.order_by(DagRun.id.desc()).limit(limit)).all()
    if not runs:
        return []
    run_ids = [r.run_id for r in runs]
    steps: dict[tuple[str, str], dict[str, list[StepRecord]]] = {}
    ti_rows = session.execute(
        select(
            TaskInstance.dag_id,
            TaskInstance.run_id,
            TaskInstance.task_id,
            TaskInstance.state,
            TaskInstance.try_number,
            TaskInstance.start_date,
            TaskInstance.end_date,
            TaskInstance.map_index,
        )
        .where(TaskInstance.dag_id.in_(ids), TaskInstance.run_id.in_(run_ids))
        .order_by(TaskInstance.map_index)
    ).all()
    for dag_id, run_id, task_id, state, try_number, start, end, map_index in ti_rows:
        record = StepRecord(task_id, _state(state), try_number or 0, start, end, map_index)
        steps.setdefault((dag_id, run_id), {}).setdefault(task_id, []).append(record)
    events: dict[tuple[str, str], list[EventRecord]] = {}
    ev_rows = session.execute(
        select(
            AssetEvent.source_dag_id,
            AssetEvent.source_run_id,
            AssetEvent.source_task_id,
            AssetEvent.extra,
            AssetEvent.timestamp,
            AssetModel.uri,
        )
        .join(AssetModel, AssetModel.id == AssetEvent.asset_id)
        .where(AssetEvent.source_dag_id.in_(ids), AssetEvent.source_run_id.in_(run_ids))
        .order_by(AssetEvent.id)
    ).all()
    for dag_id, run_id, task_id, extra, ts, uri in ev_rows:
        events.setdefault((dag_id, run_id), []).append(EventRecord(task_id, uri, dict(extra or {}), ts))
    return [
        RunRecord(
            dag_id=r.dag_id,
            run_id=r.run_id,
            state=_state(r.state),
            start=r.start_date,
            end=r.end_date,
            queued=r.queued_at,
            conf=dict(r.conf or {}),
            steps={t: tuple(tis) for t, tis in steps.get((r.dag_id, r.run_id), {}).items()},
            events=tuple(events.get((r.dag_id, r.run_id), ())),
        )
        for r in runs
    ]


# ------------------------------------------------------------------------------------ the work folder


class WorkFiles:
    """Finds and reads a run's work folder: a local path, or `gs://...` (GCS FUSE work volume, read with gcsfs).

    `pvc_mount`: where this process mounts the pods' work PVC (`CKPTFLOW_UI_WORK_MOUNT`), so `pvc://claim/rel`
    URIs become `<pvc_mount>/rel`; without it a PVC's files are out of reach and only database data is shown.
    """

    def __init__(self, pvc_mount: str | None = None, gcs_filesystem=None):
        self.pvc_mount = pvc_mount
        self._gcs = gcs_filesystem

    @classmethod
    def from_env(cls) -> WorkFiles:
        return cls(pvc_mount=os.environ.get("CKPTFLOW_UI_WORK_MOUNT") or None)

    def location(self, uri: str) -> str | None:
        """A readable location (local path or gs:// URI) for an asset URI, or None."""
        parsed = urllib.parse.urlsplit(uri)
        if parsed.scheme == "file":
            return urllib.parse.unquote(parsed.path)
        if parsed.scheme == "gs":
            return uri
        if parsed.scheme == "pvc" and self.pvc_mount:
            rel = urllib.parse.unquote(parsed.path).lstrip("/")
            return str(Path(self.pvc_mount, rel))
        return None

    @staticmethod
    def join(location: str, *parts: str) -> str:
        if location.startswith("gs://"):
            return "/".join([location.rstrip("/"), *parts])
        return str(Path(location, *parts))

    @staticmethod
    def parent(location: str) -> str:
        if location.startswith("gs://"):
            return location.rstrip("/").rsplit("/", 1)[0]
        return str(Path(location).parent)

    def _gcsfs(self):
        if self._gcs is None:
            import gcsfs  # with the Google provider; credentials from the environment (Workload Identity)

            self._gcs = gcsfs.GCSFileSystem()
        return self._gcs

    def read_bytes(self, location: str | None, max_bytes: int = 64 * 1024 * 1024) -> bytes | None:
        if not location:
            return None
        try:
            if location.startswith("gs://"):
                fs = self._gcsfs()
                with fs.open(location, "rb") as f:
                    return f.read(max_bytes)
            with open(location, "rb") as f:
                return f.read(max_bytes)
        except Exception:  # missing, unreadable, no credentials: the page shows what it has
            return None

    def read_json(self, location: str | None) -> dict | None:
        data = self.read_bytes(location)
        if data is None:
            return None
        try:
            value = json.loads(data)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def exists(self, location: str | None) -> bool:
        if not location:
            return False
        try:
            if location.startswith("gs://"):
                return bool(self._gcsfs().exists(location))
            return Path(location).is_file()
        except Exception:
            return False


def _spec(conf: dict) -> RunSpec | None:
    try:
        return RunSpec.from_params(conf)
    except (TypeError, ValueError):
        return None


def run_folder(run: RunRecord, files: WorkFiles, spec: RunSpec | None) -> str | None:
    """Where the run's steps wrote: the parent of a work-folder URI its events name, else the configured layout."""
    for event in run.events:
        # work-folder outputs: the staged source, the converted checkpoint (from a finalize in parts), the report
        if event.task_id in ("download", DOWNLOAD_FINALIZE, "convert", FINALIZE, "verify"):
            loc = files.location(event.uri)
            if loc:
                return files.parent(loc)
    if spec is None:
        return None
    if spec.execution_mode == "local":
        from operators.ckptflow_operators import default_work_root

        return WorkLayout.for_run(default_work_root(), run.dag_id, run.run_id).root
    if files.pvc_mount:
        return WorkLayout.for_run(files.pvc_mount, run.dag_id, run.run_id).root
    from operators.kubernetes import KubernetesSettings

    try:
        settings = KubernetesSettings.from_env()
    except ValueError:
        return None
    layout = WorkLayout.for_run(settings.mount_path, run.dag_id, run.run_id)
    return files.location(settings.work_volume.uri(settings.mount_path, layout.root))


# ---------------------------------------------------------------------------------------- conversions


@dataclass
class Step:
    """A task of the run; a step in parts (a mapped task) sums up its task instances."""

    task_id: str
    state: str | None  # in parts: the worst part's
    try_number: int  # in parts: the most tries any part took
    seconds: float | None  # in parts: from the first part's start to the last part's end
    parts: int = 1
    parts_done: int = 0
    parts_retried: int = 0

    @property
    def summary(self) -> str:
        """e.g. `verify: success (try 2)`, `convert: 3/3 parts done, 1 retried`, `download: 1/2 parts done (failed)`."""
        if self.parts > 1:
            text = f"{self.task_id}: {self.parts_done}/{self.parts} parts done"
            text += f", {self.parts_retried} retried" if self.parts_retried else ""
            return text if self.state == "success" else f"{text} ({self.state or 'waiting'})"
        return f"{self.task_id}: {self.state or 'not run'}" + (
            f" (try {self.try_number})" if self.try_number > 1 else ""
        )

    @property
    def note(self) -> str | None:
        """The line the page shows under the run's duration: how a step in parts went, or a step's retries."""
        if self.parts > 1:
            return self.summary
        return f"{self.task_id}: {self.try_number} tries" if self.try_number > 1 else None


@dataclass
class Conversion:
    """One conversion (one DAG run) as the page shows it."""

    dag_id: str
    run_id: str
    run_state: str | None
    status: str  # a key of STATUSES
    started: datetime | None
    ended: datetime | None
    duration_seconds: float | None
    model: str  # model name, else the detected family, else "auto"
    family: str | None
    source: str
    source_is_local: bool
    revision: str | None  # requested hub revision
    revision_sha: str | None  # the commit it resolved to (hub sources)
    source_digest: str | None  # digest of the staged source files
    direction: str | None
    layout: str | None
    dtype: str | None
    destination: str | None
    execution_mode: str | None
    verify: dict[str, Any] | None  # passed, kl_mean, kl_max, max_kl_threshold, num_tokens, ...
    size_bytes: int | None
    files: int | None
    output_digest: str | None
    publish_status: str | None
    failed_step: str | None
    steps: list[Step] = field(default_factory=list)
    work_folder: str | None = None
    has_plot: bool = False
    has_report: bool = False
    has_manifest: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return self.dag_id, self.run_id

    @property
    def direction_label(self) -> str:
        """`HF → MaxText` for a known direction, else the recorded value as it is (`–` when none)."""
        try:
            return Direction.from_param(self.direction).arrow
        except ValueError:
            return self.direction or "–"

    @property
    def verify_label(self) -> str:
        if not self.verify or "passed" not in self.verify:
            return "running" if self.status == "running" and self.failed_step is None else "not run"
        return "passed" if self.verify["passed"] else "failed"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("started", "ended"):
            d[k] = d[k].isoformat() if d[k] else None
        d["verify_label"] = self.verify_label
        for step, out in zip(self.steps, d["steps"]):
            out["summary"] = step.summary
        return d


def _seconds(start: datetime | None, end: datetime | None, now: datetime) -> float | None:
    if start is None:
        return None
    return max(0.0, ((end or now) - start).total_seconds())


def _merged_extras(run: RunRecord) -> dict[str, Any]:
    """The extras of all the run's events merged in step order: a later step's value wins, and what only an
    earlier step knew (the source revision sha, when later pods could not read the download result) stays."""
    merged: dict[str, Any] = {}
    order = {s: i for i, s in enumerate(TASKS)}
    for e in sorted(run.events, key=lambda e: order.get(e.task_id or "", -1)):
        merged.update({k: v for k, v in e.extra.items() if v is not None})
    return merged


def _step(task_id: str, instances: tuple[StepRecord, ...], now: datetime) -> Step:
    tis = [t for t in instances if t.state != "removed"]  # parts a re-run with fewer parts no longer has
    if not tis:
        return Step(task_id, None, 0, None)
    rank = {s: i for i, s in enumerate(_WORST_FIRST)}
    state = min((t.state for t in tis), key=lambda s: rank.get(s, rank[None]))
    starts = [t.start for t in tis if t.start]
    end = None if any(t.end is None for t in tis) else max(t.end for t in tis)
    return Step(
        task_id,
        state,
        max(t.try_number for t in tis),
        _seconds(min(starts), end, now) if starts else None,
        parts=len(tis),
        parts_done=sum(t.state == "success" for t in tis),
        parts_retried=sum(t.try_number > 1 for t in tis),
    )


def pipeline_steps(run: RunRecord, spec: RunSpec | None, now: datetime) -> list[Step]:
    """The run's steps in pipeline order; plan_parts and the finalize tasks only for a run in parts."""
    steps = [_step(t, run.steps.get(t, ()), now) for t in TASKS]
    in_parts = spec.parts > 1 if spec else any(s.parts > 1 for s in steps)
    return [s for s in steps if in_parts or s.task_id not in _PARTS_ONLY]


def _status(run: RunRecord, verify: dict | None) -> tuple[str, str | None]:
    failed = next((t for t in TASKS if any(ti.state == "failed" for ti in run.steps.get(t, ()))), None)
    state = run.state or ""
    if state in _RUNNING_STATES or (not state and not failed):
        return "running", failed
    if state == "success":
        return "published", None
    if failed == "verify" and verify and verify.get("passed") is False:
        return "verify-failed", failed
    return "failed", failed


def build_conversion(run: RunRecord, files: WorkFiles, now: datetime | None = None) -> Conversion:
    now = now or datetime.now(timezone.utc)
    spec = _spec(run.conf)
    extras = _merged_extras(run)
    folder = run_folder(run, files, spec)

    def at(*parts: str) -> str | None:
        return files.join(folder, *parts) if folder else None

    download = files.read_json(at("source", DOWNLOAD_MANIFEST))
    manifest = files.read_json(at("converted", CONVERT_MANIFEST))
    report = files.read_json(at("verify", VERIFY_REPORT))
    receipt = files.read_json(at(PUBLISH_RECEIPT))

    verify = verify_metrics(report) or extras.get("verify") or None
    status, failed_step = _status(run, verify)
    options = (manifest or {}).get("options") or {}
    family = (manifest or {}).get("family") or extras.get("family")
    requested = spec.model_name if spec else run.conf.get("model")
    model = requested if requested and requested != "auto" else (family or "auto")
    layout_name = extras.get("layout")
    if isinstance(options.get("scan_layers"), bool):
        layout_name = "scanned" if options["scan_layers"] else "unscanned"
    if layout_name is None and spec is not None:
        layout_name = spec.layout
    outputs = (manifest or {}).get("outputs") or {}
    size = (receipt or {}).get("bytes")
    if size is None and outputs:
        try:
            size = sum(int(o.get("bytes") or 0) for o in outputs.values())
        except (AttributeError, TypeError, ValueError):
            size = None
    n_files = (receipt or {}).get("files") or (len(outputs) if outputs else None)
    source = spec.source if spec else str(run.conf.get("source", "?"))
    source_is_local = spec.source_is_local if spec else source.startswith(("/", "file://"))

    steps = pipeline_steps(run, spec, now)

    return Conversion(
        dag_id=run.dag_id,
        run_id=run.run_id,
        run_state=run.state,
        status=status,
        started=run.start or run.queued,
        ended=run.end,
        duration_seconds=_seconds(run.start, run.end, now),
        model=model,
        family=family,
        source=source,
        source_is_local=source_is_local,
        revision=None if source_is_local else (spec.revision if spec else run.conf.get("revision")),
        revision_sha=(download or {}).get("revision") or extras.get("source_revision_sha"),
        source_digest=(download or {}).get("digest") or extras.get("source_digest"),
        direction=spec.direction.param if spec else extras.get("direction"),
        layout=layout_name,
        dtype=options.get("dtype") or extras.get("dtype") or (spec.dtype if spec else None),
        destination=(receipt or {}).get("destination")
        or extras.get("destination")
        or (spec.destination if spec else None),
        execution_mode=spec.execution_mode if spec else run.conf.get("execution_mode"),
        verify=verify,
        size_bytes=int(size) if isinstance(size, (int, float)) else None,
        files=n_files if isinstance(n_files, int) else None,
        output_digest=(receipt or {}).get("digest") or extras.get("published_digest") or extras.get("output_digest"),
        publish_status=(receipt or {}).get("status") or extras.get("publish_status"),
        failed_step=failed_step,
        steps=steps,
        work_folder=folder,
        has_plot=files.exists(at("verify", PLOT_NAME)),
        has_report=files.exists(at("verify", REPORT_NAME)),
        has_manifest=manifest is not None,
    )


def manifest_locations(run: RunRecord, files: WorkFiles) -> list[str]:
    """Where the conversion's lineage manifest (`ckptflow-manifest.json`: source, options and the BLAKE3 of
    every file written) can be read: the published copy first, then the converted folder in the work folder."""
    out = []
    published = next((e for e in run.events if e.task_id == "publish"), None)
    if published is not None:
        loc = files.location(published.extra.get("destination") or published.uri)
        if loc:
            out.append(files.join(loc, CONVERT_MANIFEST))
    folder = run_folder(run, files, _spec(run.conf))
    if folder:
        out.append(files.join(folder, "converted", CONVERT_MANIFEST))
    return out


def lineage_manifest(run: RunRecord, files: WorkFiles) -> dict[str, Any]:
    """Everything known about where a conversion came from and what it produced, as one JSON document:
    the run and its parameters, each step's asset events (URI + extras), and the result files of the steps."""
    spec = _spec(run.conf)
    folder = run_folder(run, files, spec)

    def read(*parts: str):
        return files.read_json(files.join(folder, *parts)) if folder else None

    def iso(t: datetime | None) -> str | None:
        return t.isoformat() if t else None

    return {
        "kind": "ckptflow-lineage",
        "dag_id": run.dag_id,
        "run_id": run.run_id,
        "state": run.state,
        "start": iso(run.start),
        "end": iso(run.end),
        "params": run.conf,
        "steps": [
            {
                "step": s.task_id,
                "state": s.state,
                "try_number": s.try_number if s.task_id in run.steps else None,
                **(
                    {"parts": s.parts, "parts_done": s.parts_done, "parts_retried": s.parts_retried}
                    if s.parts > 1
                    else {}
                ),
                "asset_events": [
                    {"uri": e.uri, "timestamp": iso(e.timestamp), "extra": e.extra}
                    for e in run.events
                    if e.task_id == s.task_id
                ],
            }
            for s in pipeline_steps(run, spec, datetime.now(timezone.utc))
        ],
        "work_folder": folder,
        "download": read("source", DOWNLOAD_MANIFEST),
        "convert_manifest": read("converted", CONVERT_MANIFEST),
        "verify_summary": (read("verify", VERIFY_REPORT) or {}).get("summary"),
        "publish_receipt": read(PUBLISH_RECEIPT),
    }


class ConversionCache:
    """Finished runs do not change: keep their `Conversion` until the run's state, tries or events change."""

    def __init__(self, size: int = 2048):
        self.size = size
        self._data: OrderedDict[tuple[str, str], tuple[tuple, Conversion]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run: RunRecord, files: WorkFiles, now: datetime | None = None) -> Conversion:
        key, fp = (run.dag_id, run.run_id), run.fingerprint()
        with self._lock:
            hit = self._data.get(key)
            if hit and hit[0] == fp:
                self._data.move_to_end(key)
                return hit[1]
        conv = build_conversion(run, files, now)
        if conv.status != "running":
            with self._lock:
                self._data[key] = (fp, conv)
                while len(self._data) > self.size:
                    self._data.popitem(last=False)
        return conv

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def filter_conversions(
    conversions: list[Conversion], model: str | None = None, status: str | None = None
) -> list[Conversion]:
    return [c for c in conversions if (not model or c.model == model) and (not status or c.status == status)]

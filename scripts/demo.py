"""`make demo`: the `convert_checkpoint` Airflow pipeline end to end on the embedded default.

1. builds a tiny Llama 3.1 with `ckptflow make-test-model` (no download);
2. starts a fresh Airflow home in the output folder: SQLite, LocalExecutor (parallelism 4), no examples,
   OpenLineage events to a file;
3. runs the `convert_checkpoint` DAG with `dag.test()` in local mode:
   download -> convert (HF -> MaxText, scanned) -> verify (logits) -> publish to a local folder;
4. prints where the checkpoint, the verify report and the lineage events are.

Airflow's own log goes to `<out>/airflow-run.log` (`--verbose` shows it instead). Running the demo again
starts over: the output folder is replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    import operators  # noqa: F401  (installed with ckptflow)
except ImportError:  # a checkout used as is
    sys.path.insert(0, str(REPO))

from operators import embedded  # noqa: E402  (light: no Airflow import yet)

MARKER = ".ckptflow-demo"


@contextlib.contextmanager
def output_to(path: Path | None):
    """Send this process's stdout/stderr (file descriptors, so child processes too) to `path`."""
    if path is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def fresh(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).exists() and any(out.iterdir()):
            raise SystemExit(f"{out} exists and was not made by the demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by scripts/demo.py; replaced on every run\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default ./demo-output)")
    p.add_argument("--family", default="llama3.1", choices=("llama3.1", "qwen2.5", "qwen3"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--verbose", action="store_true", help="show Airflow's log instead of writing it to a file")
    args = p.parse_args(argv)

    out = args.out.absolute()
    fresh(out)
    home = out / "airflow"
    env = embedded.configure(home)  # before Airflow is imported
    model = out / f"hf-{args.family}-tiny"
    dest = out / "published" / f"{args.family}-tiny" / "maxtext-scanned"
    airflow_log = None if args.verbose else out / "airflow-run.log"

    print(f"building a tiny {args.family} ({args.layers} layers) with ckptflow make-test-model ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "converters", "make-test-model", args.family, str(model), "--layers", str(args.layers)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    print(f"Airflow {embedded_version()} embedded: SQLite + LocalExecutor in {home}", flush=True)
    print(
        "running DAG convert_checkpoint (download -> convert -> verify -> publish; parts=1), local mode ...", flush=True
    )
    t0 = time.monotonic()
    with output_to(airflow_log):
        embedded.migrate()
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(embedded.DAGS_FOLDER))
        if bag.import_errors:
            raise SystemExit(f"DAG import errors: {bag.import_errors}")
        dag = bag.get_dag("convert_checkpoint")
        conf = {"source": str(model), "destination": dest.as_uri(), "direction": "hf-to-maxtext", "scan": True}
        dr = dag.test(run_conf=conf)
        order = [t.task_id for t in dag.topological_sort()]
        tis = sorted(dr.get_task_instances(), key=lambda ti: (order.index(ti.task_id), ti.map_index))
        asset_events = load_asset_events(dr.run_id)
    seconds = time.monotonic() - t0

    run_dir = Path(env["CKPTFLOW_WORK_ROOT"], "convert_checkpoint")
    run_dir = next(run_dir.iterdir(), run_dir)
    report = run_dir / "verify"
    verdict = {}
    with contextlib.suppress(OSError, ValueError):
        verdict = json.loads((report / "verify.json").read_text())["summary"]
    events_file = out / "asset-events.json"
    events_file.write_text(json.dumps(asset_events, indent=2, default=str) + "\n")
    ol_file = home / "openlineage-events.jsonl"
    ol = embedded.ol_events(home)

    print(f"\nrun {dr.run_id}: {dr.state} in {seconds:.1f} s")
    for ti in tis:
        note = ""
        if ti.task_id == "verify" and verdict:
            parts = ", ".join(f"{k} {'ok' if verdict.get(f'{k}_passed') else 'FAILED'}" for k in ("content", "layout"))
            note = (
                f"  {parts}, precision: max per-token KL {verdict['kl_max']:.2e} "
                f"(threshold {verdict['max_kl_threshold']:g})"
            )
        part = f"[{ti.map_index}]" if ti.map_index >= 0 else ""
        print(f"  {ti.task_id + part:<20} {ti.state} (try {ti.try_number}){note}")
    print()
    if str(dr.state) == "success":
        print(f"checkpoint:      {dest}  (MaxText load_parameters_path={dest / '0' / 'items'})")
    else:
        print(f"checkpoint:      not published (run {dr.state}); work folder {run_dir}")
    print(f"verify report:   {report / 'verify.md'}  (+ verify.json, kl_per_token.png)")
    print(f"lineage events:  {ol_file}  ({len(ol)} OpenLineage events)")
    print(f"                 {events_file}  ({len(asset_events)} Airflow asset events with extras)")
    print(f"work folder:     {run_dir}")
    if airflow_log:
        print(f"Airflow log:     {airflow_log}")
    print(
        f"\nlook around:     export AIRFLOW_HOME={home} AIRFLOW__CORE__DAGS_FOLDER={embedded.DAGS_FOLDER} "
        f"AIRFLOW__CORE__PLUGINS_FOLDER={embedded.PLUGINS_FOLDER}"
    )
    print("                 airflow assets list   # or `airflow standalone` and open the UI")
    return 0 if str(dr.state) == "success" else 1


def embedded_version() -> str:
    from importlib.metadata import version

    return version("apache-airflow")


def load_asset_events(run_id: str) -> list[dict]:
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(AssetEvent).filter(AssetEvent.source_run_id == run_id).order_by(AssetEvent.id).all()
        return [{"task": e.source_task_id, "uri": e.uri, "timestamp": e.timestamp, "extra": e.extra} for e in rows]


if __name__ == "__main__":
    raise SystemExit(main())

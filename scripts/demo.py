"""`make demo`: the `convert_checkpoint` Airflow pipeline end to end on the embedded default.

1. builds a tiny Llama 3.1 with `ckptflow make-test-model` (no download);
2. starts a fresh Airflow home in the output folder: SQLite, LocalExecutor (parallelism 4), no examples,
   OpenLineage events to a file;
3. runs the `convert_checkpoint` DAG with `dag.test()` in local mode:
   download -> convert (HF -> MaxText, scanned) -> verify (logits) -> publish to a local folder;
4. prints where the checkpoint, the verify report and the lineage events are.

`--mode kubernetes` (`make demo MODE=kubernetes`) runs the same DAG in kubernetes mode, with `parts=2`, every step
a pod on a local Kubernetes API stand-in (`tests/stand_ins/kube_api.py`: a real API the provider talks to through a
kubeconfig, whose "kubelet" runs each pod's command as a local process, here the real `ckptflow` of this venv as
the converter image would): the step operators create, watch and delete their pods, deferrable (Airflow's
`[operators] default_deferrable`; `dag.test()` runs the triggers in process), the work volume is a PVC folder of
the stand-in, the HF token path is the per-pod Secret.

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


IMAGE = "ckptflow-converter:demo"
DEMO_MODELS = {"llama3.1": "llama3.1-8b", "qwen2.5": "qwen2.5-7b", "qwen3": "qwen3-8b"}


@contextlib.contextmanager
def stand_in_cluster(workdir: Path):
    """The Kubernetes API stand-in with a `ckptflow-cpu` node whose converter image runs this venv's `ckptflow`, and
    the workers' settings pointing the step pods at it (deferrable, the `kubernetes_default` connection)."""
    from operators.kubernetes import NODEPOOL_LABEL

    if str(REPO) not in sys.path:  # the stand-in is test infrastructure of the checkout, not installed
        sys.path.insert(0, str(REPO))
    from tests.stand_ins.kube_api import Image, KubeApiServer, Node, kube_env

    image = Image(env={"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"})
    nodes = [Node("cpu-node", labels={NODEPOOL_LABEL: "ckptflow-cpu"})]
    with KubeApiServer(workdir, nodes=nodes, namespaces=("default", "ckptflow"), images={IMAGE: image}) as server:
        os.environ.update(
            {**kube_env(server.kubeconfig), "CKPTFLOW_K8S_CONN_ID": "kubernetes_default", "CKPTFLOW_K8S_IMAGE": IMAGE}
        )
        yield server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default ./demo-output)")
    p.add_argument("--family", default="llama3.1", choices=("llama3.1", "qwen2.5", "qwen3"))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mode", choices=("local", "kubernetes"), default="local", help="execution mode (default local)")
    p.add_argument("--parts", type=int, help="parts of download and convert (default: 1 local, 2 kubernetes)")
    p.add_argument("--verbose", action="store_true", help="show Airflow's log instead of writing it to a file")
    args = p.parse_args(argv)
    kubernetes = args.mode == "kubernetes"
    parts = args.parts or (2 if kubernetes else 1)

    out = args.out.absolute()
    fresh(out)
    home = out / "airflow"
    env = embedded.configure(home)  # before Airflow is imported
    if kubernetes:  # every pod operator defers (read when the DAG is parsed)
        os.environ["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] = "True"
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
    cluster = contextlib.nullcontext()
    if kubernetes:
        cluster = stand_in_cluster(out / "kube")
        print("Kubernetes: a local API stand-in (tests/stand_ins/kube_api.py), pods run as local processes", flush=True)
    steps = "download -> convert -> verify -> publish"
    print(f"running DAG convert_checkpoint ({steps}; parts={parts}), {args.mode} mode ...", flush=True)
    t0 = time.monotonic()
    with cluster as kube, output_to(airflow_log):
        embedded.migrate()
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(embedded.DAGS_FOLDER))
        if bag.import_errors:
            raise SystemExit(f"DAG import errors: {bag.import_errors}")
        dag = bag.get_dag("convert_checkpoint")
        conf = {"source": str(model), "destination": dest.as_uri(), "direction": "hf-to-maxtext", "scan": True}
        conf["parts"] = parts
        if kubernetes:  # pods are sized from a registry model (the tiny one is built from llama3.1-8b's config)
            conf.update(execution_mode="kubernetes", model=DEMO_MODELS[args.family], node_pool="cpu-standard")
        dr = dag.test(run_conf=conf)
        pods = [r for r in kube.requests if r.method == "POST" and r.path.endswith("/pods")] if kube else []
        pods_left = kube.pods() if kube else []
        order = [t.task_id for t in dag.topological_sort()]
        tis = sorted(dr.get_task_instances(), key=lambda ti: (order.index(ti.task_id), ti.map_index))
        asset_events = load_asset_events(dr.run_id)
    seconds = time.monotonic() - t0

    work_root = kube.pvc_path("ckptflow-work", "ckptflow") if kube else Path(env["CKPTFLOW_WORK_ROOT"])
    run_dir = Path(work_root, "convert_checkpoint")
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
    if kubernetes:
        print(f"  {len(pods)} pods created on the stand-in; left when done: {len(pods_left)}")
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

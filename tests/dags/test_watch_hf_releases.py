"""`watch_hf_releases` against the hub stand-in: light parsing, the watch list checks, and two (three) runs over a
hub that gains one commit in between: exactly one new `convert_checkpoint` run the second time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from operators import watch
from operators.embedded import DAGS_FOLDER
from tests.stand_ins.fixtures import TOKEN, hub, model_files  # noqa: F401  (fixture)

DAG_FILE = DAGS_FOLDER / "watch_hf_releases.py"
HEAVY = (
    "jax",
    "jaxlib",
    "torch",
    "transformers",
    "tensorflow",
    "orbax",
    "tensorstore",
    "kubernetes",
    "openlineage",
    "huggingface_hub",
    "google.cloud",
    "numpy",
)


def test_parsing_imports_nothing_heavy():
    code = textwrap.dedent(f"""
        import importlib.util, json, sys, time
        t0 = time.monotonic()
        spec = importlib.util.spec_from_file_location("watch_dag", {str(DAG_FILE)!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        mods = set(sys.modules)
        heavy = sorted(h for h in {HEAVY!r} if h in mods)
        print(json.dumps({{"heavy": heavy, "seconds": time.monotonic() - t0, "tasks": sorted(module.dag.task_ids)}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["heavy"] == [] and result["seconds"] < 10
    assert result["tasks"] == ["find_new_releases", "record_state", "trigger_convert"]


def test_the_example_watch_list_is_valid_and_bad_ones_are_explained(tmp_path):
    entries = watch.load_watchlist(DAGS_FOLDER / "watchlist.example.yaml")
    assert entries[0].repo == "Qwen/Qwen3-0.6B" and len(entries[1].targets) == 2
    base = {"defaults": {"destination": "file:///m/{repo}/{sha}"}}
    for data, message in [
        ({"watch": []}, "non-empty `watch:`"),
        ({**base, "watch": [{"repo": "a/b", "author": "a"}]}, "exactly one of"),
        ({**base, "watch": [{"repo": "hf://a/b"}]}, "not a Hugging Face repo id"),
        ({"watch": [{"repo": "a/b"}]}, "no destination"),
        ({**base, "watch": [{"repo": "a/b", "dtype": "int4"}]}, "dtype must be one of"),
        ({**base, "watch": [{"repo": "a/b", "model": "gpt-5"}]}, "unknown model"),
        ({**base, "watch": [{"repo": "a/b", "destination": "s3://x/{sha}"}]}, "not a file:///path"),
        ({**base, "watch": [{"repo": "a/b", "destination": "file:///m/{commit}"}]}, "unknown placeholder"),
        ({**base, "watch": [{"repo": "a/b", "sacn": True}]}, "unknown keys"),
    ]:
        with pytest.raises(watch.WatchlistError, match=message):
            watch.parse_watchlist(data)
    conf = watch.build_conf(
        "facebook/opt", "a" * 40, {"destination": "gs://b-1/mt/{name}/{layout}-{dtype}/{sha12}", "scan": False}
    )
    assert conf == {
        "source": "facebook/opt",
        "revision": "a" * 40,
        "direction": "hf-to-maxtext",
        "scan": False,
        "destination": "gs://b-1/mt/opt/unscanned-bfloat16/aaaaaaaaaaaa",
    }
    assert watch.run_id("facebook/opt", "a" * 40, {}).startswith("watch__facebook--opt__aaaaaaaaaaaa__")


@pytest.fixture
def watch_dag(airflow_db):
    """Both DAGs as the DAG processor stores them (the trigger needs convert_checkpoint in the database)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.models.variable import Variable

    DagBundlesManager().sync_bundles_to_db()
    bag = BundleDagBag(dag_folder=str(DAGS_FOLDER), bundle_path=str(DAGS_FOLDER), bundle_name="dags-folder")
    assert not bag.import_errors, bag.import_errors
    sync_bag_to_db(bag, "dags-folder", None)
    Variable.delete("ckptflow_watch_state")
    yield bag.get_dag("watch_hf_releases")
    Variable.delete("ckptflow_watch_state")


def convert_runs() -> dict[str, dict]:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        runs = session.query(DagRun).filter(DagRun.dag_id == "convert_checkpoint", DagRun.run_id.like("watch__%")).all()
        # (the trigger adds the OpenLineage parent run to the conf; convert_checkpoint ignores unknown keys)
        return {r.run_id: {k: v for k, v in (r.conf or {}).items() if k != "openlineage"} for r in runs}


def test_two_runs_over_a_hub_that_gains_a_commit_start_exactly_one_new_conversion(
    watch_dag, hub, tmp_path, monkeypatch
):
    from airflow.models.variable import Variable

    for repo in ("acme/model-a", "acme/model-b", "other/model-c"):
        hub.state.commit(repo, model_files(extras=False))
    hub.state.commit("acme/model-gguf", {"config.json": b"{}", "model.gguf": b"x"})  # nothing convertible
    hub.state.commit("acme/unrelated", model_files(extras=False))  # does not match the pattern
    hub.state.commit("acme/model-secret", model_files(extras=False), private=True)  # listed only with the token
    hub.state.page_size = 2  # list_models pages through Link headers
    watchlist = tmp_path / "watchlist.yaml"
    watchlist.write_text(
        textwrap.dedent("""
        defaults:
          destination: "file:///models/{org}/{name}/{layout}/{sha12}"
        watch:
          - author: acme
            match: "model-*"
            dtype: float32
          - repo: other/model-c
            model: llama3.1-8b
            targets: [{scan: true}, {scan: false}]
          - repo: gone/deleted-repo        # not on the hub (any more): logged and skipped, not fatal
    """)
    )
    monkeypatch.setenv("AIRFLOW_CONN_CKPTFLOW_HF", json.dumps({"conn_type": "generic", "password": TOKEN}))
    before = set(convert_runs())

    dr = watch_dag.test(run_conf={"watchlist": str(watchlist)})
    assert dr.state == "success", {ti.task_id: ti.state for ti in dr.get_task_instances()}
    first = {k: v for k, v in convert_runs().items() if k not in before}
    assert sorted(c["source"] for c in first.values()) == [
        "acme/model-a",
        "acme/model-b",
        "acme/model-secret",
        "other/model-c",
        "other/model-c",
    ]
    for run_id, conf in first.items():
        sha = hub.state.repos[conf["source"]].refs["main"]
        assert conf["revision"] == sha and sha[:12] in run_id and conf["destination"].endswith(sha[:12])
        assert conf["direction"] == "hf-to-maxtext"
    c = sorted((v for v in first.values() if v["source"] == "other/model-c"), key=lambda v: v["scan"])
    assert (
        [v["scan"] for v in c] == [False, True]
        and c[0]["model"] == "llama3.1-8b"
        and "/unscanned/" in c[0]["destination"]
    )
    assert all(v["dtype"] == "float32" for v in first.values() if v["source"].startswith("acme/"))
    assert len(json.loads(Variable.get("ckptflow_watch_state"))) == 5

    new_sha = hub.state.commit("acme/model-b", {"generation_config.json": b'{"bos_token_id": 2}'})
    hub.state.throttle.update(list=1, info=2)  # the hub rate-limits this poll: waited out, not fatal
    dr = watch_dag.test(run_conf={"watchlist": str(watchlist)})
    assert dr.state == "success"
    second = {k: v for k, v in convert_runs().items() if k not in before and k not in first}
    assert list(second.values()) == [
        {
            **first_conf(first, "acme/model-b"),
            "revision": new_sha,
            "destination": f"file:///models/acme/model-b/scanned/{new_sha[:12]}",
        }
    ]
    assert hub.state.throttle == {"list": 0, "info": 0}

    Variable.delete("ckptflow_watch_state")  # state lost: the run ids still keep every conversion single
    dr = watch_dag.test(run_conf={"watchlist": str(watchlist)})
    assert dr.state == "success"
    assert set(convert_runs()) == before | set(first) | set(second)
    assert (
        json.loads(Variable.get("ckptflow_watch_state"))[
            "acme/model-b#"
            + watch.target_id({"destination": "file:///models/{org}/{name}/{layout}/{sha12}", "dtype": "float32"})
        ]["sha"]
        == new_sha
    )


def first_conf(runs: dict, source: str) -> dict:
    return next(v for v in runs.values() if v["source"] == source)

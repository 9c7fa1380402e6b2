"""The Checkpoints page: the plugin loads in Airflow and is mounted by the API server app, and the page shows
the real runs of `convert_checkpoint` made by the `conversion_runs` fixture (filters, links, plot, lineage,
authentication and authorization through Airflow's auth manager)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.parse
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"

JWT_SECRET = "ckptflow-ui-test-" + "1" * 64


def test_plugin_loads_in_airflow_and_is_mounted_by_the_api_server():
    """A fresh interpreter, configured like an API server with our plugins folder."""
    code = textwrap.dedent("""
        import json
        from starlette.routing import Mount
        from airflow import plugins_manager
        from airflow.api_fastapi.app import create_app

        plugins_manager.ensure_plugins_loaded()
        info = [p for p in plugins_manager.get_plugin_info() if p["name"] == "ckptflow"]
        app = create_app("core")
        mounts = sorted(r.path for r in app.routes if isinstance(r, Mount))
        print(json.dumps({"errors": plugins_manager.get_import_errors(), "info": info, "mounts": mounts}, default=str))
    """)
    env = {**os.environ, "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS), "AIRFLOW__API_AUTH__JWT_SECRET": JWT_SECRET}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    (plugin,) = result["info"]
    assert plugin["fastapi_apps"] == [
        {"app": "fastapi.applications.FastAPI", "url_prefix": "/ckptflow", "name": "ckptflow checkpoints"}
    ]
    (view,) = plugin["external_views"]
    assert view == {
        "name": "Checkpoints",
        "href": "ckptflow/",
        "destination": "nav",
        "category": "browse",
        "url_route": "checkpoints",
    }
    assert "/ckptflow" in result["mounts"]
    assert str(plugin["source"]).endswith("ckptflow_plugin.py")


def test_plugin_modules_are_not_loaded_one_by_one():
    """The plugins folder's .airflowignore keeps Airflow from importing the package's modules as plugins."""
    from airflow._shared.module_loading import find_path_from_directory

    files = {
        Path(p).relative_to(PLUGINS).as_posix()
        for p in find_path_from_directory(str(PLUGINS), ".airflowignore", "glob")
    }
    assert {f for f in files if f.endswith(".py")} == {"ckptflow_plugin.py"}


# --------------------------------------------------------------------------------------------- the page


class Rows(HTMLParser):
    """The conversion rows of the page: each row's data attributes, cell texts, image sources and links."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: dict[str, dict] = {}
        self._row = None
        self._cell = None
        self.empty = "No conversions" in text
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-run-id" in a:
            self._row = {"attrs": a, "cells": [], "imgs": [], "links": {}}
            self.rows[a["data-run-id"]] = self._row
        elif self._row is not None and tag == "td":
            self._cell = []
            self._row["cells"].append(self._cell)
        elif self._row is not None and tag == "img":
            self._row["imgs"].append(a["src"])
        elif self._row is not None and tag == "a":
            self._href = a.get("href")

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row["cells"][-1] = " ".join(" ".join(self._cell).split())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._row is not None and getattr(self, "_href", None) and data.strip():
            self._row["links"][data.strip()] = self._href
            self._href = None


@pytest.fixture(scope="module")
def client(conversion_runs):
    from airflow.api_fastapi.app import init_auth_manager
    from ckptflow_ui import MOUNT_PREFIX
    from ckptflow_ui.app import create_app
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW__API_AUTH__JWT_SECRET", JWT_SECRET)
        mp.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
        mp.delenv("CKPTFLOW_WORK_ROOT", raising=False)
        app = FastAPI()
        init_auth_manager(app)
        app.mount(MOUNT_PREFIX, create_app())  # what the API server does with the plugin's app
        yield TestClient(app)


def token(role: str | None = "VIEWER") -> str:
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return get_auth_manager().generate_jwt(SimpleAuthManagerUser(username=f"u-{role}", role=role))


def get(client, url, role: str | None = "VIEWER", **kw):
    return client.get(url, headers={"Authorization": f"Bearer {token(role)}", **kw.pop("headers", {})}, **kw)


def q(dag_run) -> str:
    return urllib.parse.urlencode({"dag_id": dag_run.dag_id, "run_id": dag_run.run_id})


def sci(x: float) -> str:
    return f"{x:.2e}"


def test_page_shows_every_conversion_from_the_real_runs(client, conversion_runs):
    ok, bad = conversion_runs.published, conversion_runs.verify_failed
    resp = get(client, "/ckptflow/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    rows = Rows(resp.text).rows
    assert {ok.run_id, bad.run_id} <= set(rows)
    headers = [
        "Run",
        "Model",
        "Source",
        "Conversion",
        "Destination",
        "Verify (KL)",
        "KL per token",
        "Size",
        "Duration",
        "Links",
    ]
    for h in headers:
        assert f"<th>{h}</th>" in resp.text

    # The published run, cell by cell, against the files its steps wrote.
    run_dir = conversion_runs.run_dir(ok)
    download = json.loads((run_dir / "source" / "ckptflow-download.json").read_text())
    summary = json.loads((run_dir / "verify" / "verify.json").read_text())["summary"]
    receipt = json.loads((run_dir / "publish.json").read_text())
    row = rows[ok.run_id]
    run, model, source, conversion, dest, verify, plot, size, duration, links = row["cells"]
    assert row["attrs"]["data-status"] == "published" and run.startswith("Published")
    assert model == "qwen3"
    assert str(Path(download["source"].removeprefix("file://"))) in source
    assert download["digest"].split(":")[1][:12] in source
    assert conversion == "HF → MaxText scanned · float32 · local"
    assert dest.startswith(conversion_runs.published_dest.as_uri()) and "published" in dest
    assert (
        verify == f"passed mean {sci(summary['kl_mean'])} max {sci(summary['kl_max'])} threshold 0.015 · "
        f"{summary['num_tokens']} tokens"
    )
    assert row["imgs"] == [f"plot?{q(ok)}"]
    assert size.startswith(f"{receipt['bytes'] / 1024:.1f} KiB") and f"{receipt['files']} files" in size
    assert duration.endswith(" s")
    assert row["links"]["DAG run"] == f"/dags/convert_checkpoint/runs/{urllib.parse.quote(ok.run_id, safe='')}"
    assert (
        row["links"]["Lineage manifest"] == f"manifest?{q(ok)}" and row["links"]["Asset events"] == f"lineage?{q(ok)}"
    )
    assert row["links"]["Verify report"] == f"report?{q(ok)}"

    # The run stopped by verification: the verdict comes from the report (no asset event carries it).
    bad_summary = json.loads((conversion_runs.run_dir(bad) / "verify" / "verify.json").read_text())["summary"]
    assert bad_summary["passed"] is False
    row = rows[bad.run_id]
    run, model, source, conversion, dest, verify, plot, size, duration, links = row["cells"]
    assert row["attrs"]["data-status"] == "verify-failed" and run.startswith("Verify failed at verify")
    assert model == "llama3.1" and conversion == "HF → MaxText unscanned · bfloat16 · local"
    assert verify.startswith(
        f"failed mean {sci(bad_summary['kl_mean'])} max {sci(bad_summary['kl_max'])} threshold 1e-07"
    )
    assert dest == conversion_runs.failed_dest.as_uri()  # the destination asked for; nothing was published
    assert not conversion_runs.failed_dest.exists()
    assert row["imgs"] == [f"plot?{q(bad)}"]


def test_filters_by_model_and_status(client, conversion_runs):
    ok, bad = conversion_runs.published, conversion_runs.verify_failed
    only_llama = Rows(get(client, "/ckptflow/?model=llama3.1").text).rows
    assert bad.run_id in only_llama and ok.run_id not in only_llama
    published = Rows(get(client, "/ckptflow/?status=published").text).rows
    assert ok.run_id in published and bad.run_id not in published
    failed = Rows(get(client, "/ckptflow/?status=verify-failed&model=llama3.1").text).rows
    assert bad.run_id in failed and {r["attrs"]["data-status"] for r in failed.values()} == {"verify-failed"}
    nothing = Rows(get(client, "/ckptflow/?status=running&model=qwen3").text)
    assert nothing.rows == {} and nothing.empty
    page = get(client, "/ckptflow/?model=qwen3").text
    assert (
        '<option value="qwen3" selected>qwen3</option>' in page and '<option value="llama3.1">llama3.1</option>' in page
    )

    api = get(client, "/ckptflow/api/conversions", params={"status": "verify-failed"}).json()
    mine = [c for c in api["conversions"] if c["run_id"] == bad.run_id]
    assert len(mine) == 1 and mine[0]["verify"]["passed"] is False and mine[0]["failed_step"] == "verify"
    assert all(c["status"] == "verify-failed" for c in api["conversions"])


def test_plot_report_and_lineage_of_a_run(client, conversion_runs):
    ok, bad = conversion_runs.published, conversion_runs.verify_failed
    run_dir = conversion_runs.run_dir(ok)
    png = get(client, f"/ckptflow/plot?{q(ok)}")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == (run_dir / "verify" / "kl_per_token.png").read_bytes()
    report = get(client, f"/ckptflow/report?{q(ok)}")
    assert report.status_code == 200 and report.text.startswith("# ckptflow verify: PASSED")

    # The lineage manifest: the published copy for a published run, the work folder's for the other one.
    manifest = get(client, f"/ckptflow/manifest?{q(ok)}")
    assert manifest.status_code == 200 and manifest.headers["content-type"] == "application/json"
    assert manifest.content == (conversion_runs.published_dest / "ckptflow-manifest.json").read_bytes()
    manifest = get(client, f"/ckptflow/manifest?{q(bad)}")
    assert manifest.content == (conversion_runs.run_dir(bad) / "converted" / "ckptflow-manifest.json").read_bytes()
    assert manifest.json()["options"]["scan_layers"] is False

    doc = get(client, f"/ckptflow/lineage?{q(ok)}").json()
    assert doc["kind"] == "ckptflow-lineage" and doc["run_id"] == ok.run_id and doc["state"] == "success"
    steps = {s["step"]: s for s in doc["steps"]}
    assert steps["download"]["asset_events"][0]["uri"] == (run_dir / "source").as_uri()
    assert steps["publish"]["asset_events"][0]["uri"] == conversion_runs.published_dest.as_uri()
    assert steps["publish"]["asset_events"][0]["extra"]["published_digest"] == doc["publish_receipt"]["digest"]
    assert doc["convert_manifest"]["family"] == "qwen3" and doc["verify_summary"]["passed"] is True
    assert doc["params"]["destination"] == conversion_runs.published_dest.as_uri()

    doc = get(client, f"/ckptflow/lineage?{q(bad)}").json()
    steps = {s["step"]: s for s in doc["steps"]}
    assert steps["verify"]["state"] == "failed" and steps["publish"]["asset_events"] == []
    assert doc["verify_summary"]["passed"] is False and doc["publish_receipt"] is None

    assert get(client, "/ckptflow/plot?dag_id=other_dag&run_id=x").status_code == 404
    assert (
        get(client, "/ckptflow/plot", params={"dag_id": "convert_checkpoint", "run_id": "no-such-run"}).status_code
        == 404
    )


FAKE_CKPTFLOW = Path(__file__).resolve().parents[1] / "operators" / "fake_ckptflow.py"  # the operator tests' stand-in


def test_a_run_in_parts_is_summed_up_per_step(client, isolated_runs, tmp_path, monkeypatch):
    """A run in two parts (with the stand-in `ckptflow`; convert part 1 fails once): the page reads one task
    instance per part from the database and shows each step summed up, and the run's lineage lists plan_parts
    and the finalize tasks with their asset events."""
    from operators import commands

    monkeypatch.setattr(commands, "local_entrypoint", lambda: [sys.executable, str(FAKE_CKPTFLOW)])
    monkeypatch.setenv("FAKE_CKPTFLOW_STATE", str(tmp_path / "fake"))
    monkeypatch.setenv("FAKE_CKPTFLOW_FAIL_ONCE", "convert@1")
    monkeypatch.setenv("CKPTFLOW_WORK_ROOT", str(tmp_path / "work"))
    for task in isolated_runs.tasks:
        monkeypatch.setattr(task, "retry_delay", timedelta(0))
    dr = isolated_runs.test(run_conf={"source": "acme/tiny", "destination": (tmp_path / "dest").as_uri(), "parts": 2})
    assert dr.state == "success"
    monkeypatch.delenv("CKPTFLOW_WORK_ROOT")  # the page finds the work folder from the run's asset events

    page = get(client, "/ckptflow/").text
    row = Rows(page).rows[dr.run_id]
    run, model, source, conversion, dest, verify, plot, size, duration, links = row["cells"]
    assert row["attrs"]["data-status"] == "published" and verify.startswith("passed")
    assert duration.endswith("download: 2/2 parts done convert: 2/2 parts done, 1 retried")
    assert 'title="convert: 2/2 parts done, 1 retried"' in page and 'title="download_finalize: success"' in page

    doc = get(client, f"/ckptflow/lineage?{q(dr)}").json()
    steps = {s["step"]: s for s in doc["steps"]}
    assert list(steps) == ["plan_parts", "download", "download_finalize", "convert", "finalize", "verify", "publish"]
    assert (steps["convert"]["parts"], steps["convert"]["parts_done"], steps["convert"]["parts_retried"]) == (2, 2, 1)
    assert steps["convert"]["try_number"] == 2 and steps["download"]["parts_retried"] == 0
    assert [e["uri"] for e in steps["download_finalize"]["asset_events"]] == [
        Path(doc["work_folder"], "source").as_uri()
    ]
    assert steps["finalize"]["asset_events"] and not steps["download"]["asset_events"]
    assert Path(doc["work_folder"]).parent.parent == tmp_path / "work"


def test_login_and_permissions(client, conversion_runs):
    ok = conversion_runs.published
    assert client.get("/ckptflow/api/conversions").status_code == 401
    assert client.get(f"/ckptflow/plot?{q(ok)}").status_code == 401
    page = client.get("/ckptflow/", headers={"Accept": "text/html"}, follow_redirects=False)
    assert page.status_code == 307 and page.headers["location"].startswith("/auth/login?next=")
    # The UI's session cookie is enough (what the browser sends to the iframe).
    cookie = client.get("/ckptflow/", cookies={"_token": token()})
    assert cookie.status_code == 200 and ok.run_id in cookie.text
    client.cookies.clear()
    # A user without a role may read no DAG runs: no rows, no files.
    none = get(client, "/ckptflow/", role=None)
    assert none.status_code == 200 and Rows(none.text).rows == {}
    assert get(client, f"/ckptflow/plot?{q(ok)}", role=None).status_code == 403
    assert get(client, "/ckptflow/api/conversions", role=None).json()["conversions"] == []

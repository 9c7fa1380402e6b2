"""The Checkpoints page in a real Airflow API server (`airflow api-server` on 127.0.0.1 with the repo's plugins
folder and the test session's database), looked at by headless Chromium inside the Airflow UI: the table and
the KL plots are on screen, and the DAG run link moves the UI to the run.

Set CKPTFLOW_UI_SCREENSHOT=/some/file.png to keep the screenshot for a person to look at.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from chromium_cdp import Chromium, chromium_or_skip

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def api_server(conversion_runs, tmp_path_factory):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("api-server") / "api-server.log"
    env = {
        **os.environ,
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS),
        # Every request is an admin's (no login form in a headless test); the in-process tests check logins.
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__API_AUTH__JWT_SECRET": "ckptflow-ui-browser-" + "2" * 64,
    }
    env.pop("CKPTFLOW_WORK_ROOT", None)  # the page finds each run's files from the database
    airflow = shutil.which("airflow", path=str(Path(sys.executable).parent)) or "airflow"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [airflow, "api-server", "-H", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"airflow api-server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if http_get(f"{base}/api/v2/version", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"airflow api-server did not come up in 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the server and its worker: the group it was started in
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=20)
                break
            except subprocess.TimeoutExpired:
                continue


def test_api_server_mounts_the_page_and_lists_the_plugin(api_server, conversion_runs):
    status, body = http_get(f"{api_server}/api/v2/plugins")
    assert status == 200
    (plugin,) = [p for p in json.loads(body)["plugins"] if p["name"] == "ckptflow"]
    assert plugin["fastapi_apps"][0]["url_prefix"] == "/ckptflow"
    assert plugin["external_views"][0]["url_route"] == "checkpoints"
    status, page = http_get(f"{api_server}/ckptflow/")
    assert status == 200
    for run in (conversion_runs.published, conversion_runs.verify_failed):
        assert f'data-run-id="{run.run_id}"' in page.decode()
    q = urllib.parse.urlencode({"dag_id": "convert_checkpoint", "run_id": conversion_runs.published.run_id})
    status, png = http_get(f"{api_server}/ckptflow/plot?{q}")
    assert status == 200 and png.startswith(b"\x89PNG")


FRAME = "document.querySelector('iframe[title=\"Checkpoints\"]')"


def test_checkpoints_page_in_the_airflow_ui(api_server, conversion_runs, tmp_path):
    import numpy as np
    from PIL import Image

    binary = chromium_or_skip()
    ok = conversion_runs.published
    with Chromium(binary) as browser:
        browser.navigate(f"{api_server}/plugin/checkpoints")
        rows = browser.wait_for(
            f"(() => {{ const f = {FRAME}; const d = f && f.contentDocument;"
            " return d && d.querySelectorAll('#conversions tbody tr[data-run-id]').length; })()",
            timeout=60,
            what="the Checkpoints table inside the Airflow UI",
        )
        assert rows >= 2
        runs = [conversion_runs.published.run_id, conversion_runs.verify_failed.run_id]
        # The plots of these two runs (the newest rows, on screen): older runs the other suites left in the session's
        # database may have thumbnails below the fold, which lazy loading never fetches.
        widths = browser.wait_for(
            f"(() => {{ const d = {FRAME}.contentDocument;"
            f' const imgs = {json.dumps(runs)}.map(id => d.querySelector(`tr[data-run-id="${{id}}"] img`));'
            " return imgs.every(i => i && i.complete && i.naturalWidth > 0) && imgs.map(i => i.naturalWidth); })()",
            timeout=30,
            what="the KL plots to load",
        )
        assert len(widths) == 2 and all(
            w == 990 for w in widths
        )  # the verify step's kl_per_token.png, served by the plugin
        # Where the table and each run's plot are on the screen (top-level coordinates).
        geometry = browser.evaluate(
            f"(() => {{ const f = {FRAME}, fr = f.getBoundingClientRect(), d = f.contentDocument;"
            " const box = e => { const r = e.getBoundingClientRect();"
            "   return {x: fr.left + r.left, y: fr.top + r.top, w: r.width, h: r.height}; };"
            f' const imgs = {json.dumps(runs)}.map(id => box(d.querySelector(`tr[data-run-id="${{id}}"] img`)));'
            " return {table: box(d.querySelector('#conversions')), imgs: imgs,"
            "   vw: innerWidth, vh: innerHeight, nav: !!document.querySelector('nav, [role=navigation], "
            'a[href*="dags"]\')}; })()'
        )
        shot = browser.screenshot(tmp_path / "checkpoints-ui.png")
        if os.environ.get("CKPTFLOW_UI_SCREENSHOT"):
            shutil.copy(shot, os.environ["CKPTFLOW_UI_SCREENSHOT"])

        table = geometry["table"]
        assert geometry["nav"], "the Airflow UI around the page did not render"
        assert table["w"] > 800 and table["h"] > 150 and 0 <= table["y"] < geometry["vh"] - 150

        # What is actually painted: in each thumbnail's box the plot (axes, labels: dark pixels; the KL curves
        # and the red threshold line: red pixels), and text in the table's header row.
        picture = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")).astype(int)

        def region(b):
            assert b["w"] >= 200 and b["h"] >= 100, b
            assert (
                0 <= b["x"] and b["x"] + b["w"] <= geometry["vw"] and 0 <= b["y"] and b["y"] + b["h"] <= geometry["vh"]
            ), b
            return picture[int(b["y"]) : int(b["y"] + b["h"]), int(b["x"]) : int(b["x"] + b["w"])]

        for run_id, b in zip(runs, geometry["imgs"]):
            px = region(b)
            red = int(((px[..., 0] - px[..., 1:].max(axis=-1)) > 50).sum())
            drawn = int((px.sum(axis=-1) < 600).sum())
            assert red > 30 and drawn > 200, f"no plot painted for {run_id} at {b}: {red} red, {drawn} dark pixels"
        header = picture[int(table["y"]) : int(table["y"] + 30), int(table["x"]) : int(table["x"] + table["w"])]
        assert int((header.sum(axis=-1) < 400).sum()) > 100, "the table header is blank"

        # The DAG run link moves the Airflow UI itself (not the iframe) to the run.
        browser.evaluate(
            f"{FRAME}.contentDocument.querySelector('tr[data-run-id=\"{ok.run_id}\"] a[data-airflow-link]').click()"
        )
        path = f"/dags/convert_checkpoint/runs/{urllib.parse.quote(ok.run_id, safe='')}"
        browser.wait_for(f"location.pathname === {json.dumps(path)}", timeout=20, what=f"the UI to go to {path}")
        browser.wait_for(
            f"document.body.innerText.includes({json.dumps(ok.run_id)}) && !document.querySelector('iframe')",
            timeout=30,
            what="the DAG run page",
        )

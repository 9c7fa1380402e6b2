"""The Checkpoints page: a FastAPI app the plugin mounts in the Airflow API server at `/ckptflow`.

Routes (relative to the mount point):

    GET /                       the page (HTML); query: model, status, limit
    GET /api/conversions        the same data as JSON
    GET /plot?dag_id=&run_id=   the run's per-token KL plot (verify/kl_per_token.png)
    GET /report?dag_id=&run_id= the run's verify report (verify.md, as text)
    GET /manifest?dag_id=&run_id= the checkpoint's lineage manifest (ckptflow-manifest.json: source, options, the
                                BLAKE3 of every file; the published copy, else the one in the work folder)
    GET /lineage?dag_id=&run_id= the run's lineage as Airflow recorded it (JSON: params, each step's asset events
                                with their extras, the steps' result files)

Every route needs an Airflow login (the UI's session cookie or an `Authorization: Bearer` token, checked by
Airflow's auth manager) and shows only runs of DAGs whose runs the user may read. Files are only ever read
from the work folder of a run found in the metadata database: no route takes a path.

Links into the Airflow UI (a DAG run) are absolute paths under the API server's base path. Inside the UI the
page runs in a sandboxed iframe (no top navigation); its small script moves the UI itself to the DAG run
through the UI's router (same origin), and outside an iframe the links are ordinary links.
"""

from __future__ import annotations

import math
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ckptflow_ui import MOUNT_PREFIX
from ckptflow_ui.collect import (
    PLOT_NAME,
    REPORT_NAME,
    STATUSES,
    Conversion,
    ConversionCache,
    WorkFiles,
    dag_ids_from_env,
    filter_conversions,
    lineage_manifest,
    load_runs,
    manifest_locations,
)

TEMPLATES = Path(__file__).with_name("templates")
_env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
_cache = ConversionCache()


class NotLoggedIn(Exception):
    """Raised by the auth dependency; the page answers it with a redirect to Airflow's login."""


# ------------------------------------------------------------------------------------------------ auth


async def current_user(request: Request):
    """The Airflow user of this request: bearer token, else the UI's `_token` cookie (Airflow's own rules)."""
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.security import HTTPAuthorizationCredentials

    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    creds = (
        HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip())
        if scheme.lower() == "bearer" and token.strip()
        else None
    )
    try:
        return await get_user(request, None, creds)
    except HTTPException as e:
        if e.status_code == 401:
            raise NotLoggedIn() from None
        raise


def readable_dag_ids(user) -> set[str]:
    """The configured conversion DAGs whose runs `user` may read."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    manager = get_auth_manager()
    allowed = set()
    for dag_id in dag_ids_from_env():
        try:
            team = DagModel.get_team_name(dag_id)
        except Exception:
            team = None
        details = DagDetails(id=dag_id, team_name=team)
        if manager.is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN, details=details, user=user):
            allowed.add(dag_id)
    return allowed


# ------------------------------------------------------------------------------------------- formatting


def human_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def sci(x) -> str:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x):
        return "–"
    return f"{x:.2e}"


def when(t: datetime | None) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if t else "–"


def short(value: str | None, n: int = 12) -> str:
    if not value:
        return ""
    value = value.split(":", 1)[1] if value.startswith("sha256:") else value
    return value[:n]


_env.filters.update(bytes=human_bytes, seconds=human_seconds, sci=sci, when=when, short=short)


def ui_base(request: Request) -> str:
    """The Airflow UI's base path as seen from this mounted app (root_path minus our mount prefix)."""
    return (request.scope.get("root_path") or "").removesuffix(MOUNT_PREFIX)


def run_query(c: Conversion) -> str:
    return urllib.parse.urlencode({"dag_id": c.dag_id, "run_id": c.run_id})


def dag_run_href(base: str, c: Conversion) -> str:
    return f"{base}/dags/{urllib.parse.quote(c.dag_id, safe='')}/runs/{urllib.parse.quote(c.run_id, safe='')}"


# ------------------------------------------------------------------------------------------------ data


def _conversions(user, limit: int) -> list[Conversion]:
    files = WorkFiles.from_env()
    runs = load_runs(dag_ids_from_env(), limit=limit, readable_dag_ids=readable_dag_ids(user))
    now = datetime.now(timezone.utc)
    return [_cache.get(run, files, now) for run in runs]


def _run(user, dag_id: str, run_id: str):
    if dag_id not in dag_ids_from_env():
        raise HTTPException(404, f"{dag_id} is not a conversion DAG")
    if dag_id not in readable_dag_ids(user):
        raise HTTPException(403, "Forbidden")
    runs = load_runs([dag_id], limit=1, run_id=run_id)
    if not runs:
        raise HTTPException(404, "no such DAG run")
    return runs[0]


# ------------------------------------------------------------------------------------------------- app


def create_app() -> FastAPI:
    app = FastAPI(
        title="ckptflow checkpoints",
        description="Every checkpoint conversion run by ckptflow's Airflow pipeline.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.exception_handler(NotLoggedIn)
    async def _login(request: Request, exc: NotLoggedIn):
        accept = request.headers.get("accept", "")
        if request.url.path.rstrip("/").endswith(MOUNT_PREFIX) and "text/html" in accept:
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=307)
        return JSONResponse({"detail": "Not authenticated"}, status_code=401)

    @app.get("/", response_class=HTMLResponse, name="page")
    def page(
        request: Request,
        model: str | None = Query(None, description="only this model (name or family)"),
        status: str | None = Query(None, description="only this status: " + ", ".join(STATUSES)),
        limit: int = Query(200, ge=1, le=5000),
        user=Depends(current_user),
    ):
        everything = _conversions(user, limit)
        models = sorted({c.model for c in everything})
        shown = filter_conversions(everything, model or None, status or None)
        counts = {k: sum(1 for c in everything if c.status == k) for k in STATUSES}
        base = ui_base(request)
        rows = [
            {
                "c": c,
                "q": run_query(c),
                "dag_run_href": dag_run_href(base, c),
                "status_label": STATUSES.get(c.status, c.status),
            }
            for c in shown
        ]
        body = _env.get_template("checkpoints.html").render(
            rows=rows,
            models=models,
            statuses=STATUSES,
            selected_model=model or "",
            selected_status=status or "",
            counts=counts,
            total=len(everything),
            limit=limit,
            dag_ids=dag_ids_from_env(),
            generated=datetime.now(timezone.utc),
        )
        return HTMLResponse(body, headers={"Cache-Control": "no-store"})

    @app.get("/api/conversions")
    def conversions(
        model: str | None = None,
        status: str | None = None,
        limit: int = Query(200, ge=1, le=5000),
        user=Depends(current_user),
    ):
        shown = filter_conversions(_conversions(user, limit), model or None, status or None)
        return {"conversions": [c.to_dict() for c in shown], "total": len(shown)}

    @app.get("/plot")
    def plot(dag_id: str, run_id: str, user=Depends(current_user)):
        return _file_response(_run(user, dag_id, run_id), ("verify", PLOT_NAME), "image/png")

    @app.get("/report")
    def report(dag_id: str, run_id: str, user=Depends(current_user)):
        return _file_response(_run(user, dag_id, run_id), ("verify", REPORT_NAME), "text/plain; charset=utf-8")

    @app.get("/manifest")
    def manifest(dag_id: str, run_id: str, user=Depends(current_user)):
        run, files = _run(user, dag_id, run_id), WorkFiles.from_env()
        for location in manifest_locations(run, files):
            data = files.read_bytes(location)
            if data is not None:
                return Response(data, media_type="application/json")
        return PlainTextResponse(
            f"the lineage manifest of run {run_id} is not readable from the API server", status_code=404
        )

    @app.get("/lineage")
    def lineage(dag_id: str, run_id: str, user=Depends(current_user)):
        return JSONResponse(lineage_manifest(_run(user, dag_id, run_id), WorkFiles.from_env()))

    return app


def _file_response(run, parts: tuple[str, ...], media_type: str) -> Response:
    from ckptflow_ui.collect import _spec, run_folder

    files = WorkFiles.from_env()
    folder = run_folder(run, files, _spec(run.conf))
    data = files.read_bytes(files.join(folder, *parts)) if folder else None
    if data is None:
        return PlainTextResponse(
            f"{'/'.join(parts)} of run {run.run_id} is not readable from the API server", status_code=404
        )
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=300"})


app = create_app()

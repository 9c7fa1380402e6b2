"""ckptflow's Airflow plugin: the "Checkpoints" page (every conversion at a glance) in the Airflow UI.

The page is the FastAPI app of `ckptflow_ui` (this folder), which the API server mounts at `/ckptflow`; the
external view puts it in the UI's navigation ("Browse" -> "Checkpoints", at `<base>/plugin/checkpoints`),
rendered in an iframe. Deploy by putting this folder in Airflow's plugins folder (the `airflow` image does).

Settings (environment of the API server):

    CKPTFLOW_UI_DAG_IDS       DAGs whose runs are conversions (comma-separated; default convert_checkpoint)
    CKPTFLOW_UI_WORK_MOUNT    where the API server mounts the pods' work PVC (kubernetes mode with a PVC), so the
                              page can show verify plots and sizes; a GCS FUSE work volume is read through gcsfs
    CKPTFLOW_WORK_ROOT        local mode's work root (as for the workers)
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # Airflow puts the plugins folder on sys.path; make sure when loaded otherwise
    sys.path.append(_HERE)

from airflow.plugins_manager import AirflowPlugin  # noqa: E402
from ckptflow_ui import MOUNT_PREFIX, URL_ROUTE  # noqa: E402
from ckptflow_ui.app import app as checkpoints_app  # noqa: E402


class CkptflowPlugin(AirflowPlugin):
    name = "ckptflow"
    fastapi_apps = [{"app": checkpoints_app, "url_prefix": MOUNT_PREFIX, "name": "ckptflow checkpoints"}]
    external_views = [
        {
            "name": "Checkpoints",
            # Relative to the UI's base URL, so it works behind a path prefix too; the trailing slash matters.
            "href": MOUNT_PREFIX.lstrip("/") + "/",
            "destination": "nav",
            "category": "browse",
            "url_route": URL_ROUTE,
        }
    ]

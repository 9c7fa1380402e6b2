"""ckptflow's "Checkpoints" page for the Airflow UI (an Airflow 3 plugin; registered by `plugins/ckptflow_plugin.py`).

* `collect`: one `Conversion` per DAG run of the conversion DAG, gathered from Airflow's metadata database
  (DAG runs, task instances, asset events with their extras) and, where the API server can reach it, the run's
  work folder (`ckptflow-download.json`, `ckptflow-manifest.json`, `verify/verify.json`, `publish.json`, the
  per-token KL plot).
* `app`: the FastAPI app the plugin mounts in the Airflow API server (the page, a JSON API, the KL plot, the
  verify report and a lineage manifest per run), authenticated and authorized by Airflow's auth manager.

Importing this package imports FastAPI and Jinja only (both ship with Airflow); the database and the auth
manager are touched when a request is served.
"""

MOUNT_PREFIX = "/ckptflow"  # where the plugin mounts the app in the API server
URL_ROUTE = "checkpoints"  # the page's route in the Airflow UI: <base>/plugin/checkpoints

"""`watch_hf_releases`: poll the Hugging Face hub for new repos and new commits, start one `convert_checkpoint`
run per new (repo, commit, target).

Parsing this file imports Airflow's task SDK, the standard provider's TriggerDagRunOperator and the light
`operators.watch` only; the hub client is imported when the task runs.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

try:
    import operators  # noqa: F401  (installed with ckptflow)
except ImportError:  # a checkout used as is: the repo root is the DAG folder's parent
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import DAG, Param, task

DAG_ID = "watch_hf_releases"
CONVERT_DAG_ID = "convert_checkpoint"
STATE_VARIABLE = "ckptflow_watch_state"  # {"<repo>#<target>": {"sha", "run_id", "triggered_at"}}
WATCHLIST_VARIABLE = "ckptflow_watchlist"  # optional: path of the watch list
HF_CONN_ID = "ckptflow_hf"
DEFAULT_WATCHLIST = Path(__file__).with_name("watchlist.yaml")
SCHEDULE = os.environ.get("CKPTFLOW_WATCH_SCHEDULE", "@hourly")

DOC = f"""
# watch_hf_releases

Every run ({SCHEDULE} by default; `CKPTFLOW_WATCH_SCHEDULE` changes it) reads the **watch list**, asks the hub
for the current commit of every watched repo (`model_info`) and every matching repo of watched authors
(`list_models` with `expand=sha,createdAt,siblings,...`), and starts one `{CONVERT_DAG_ID}` run per
(repo, commit, target) not started before, with the source pinned to that commit sha.

* **Watch list**: the `watchlist` param, else the Airflow Variable `{WATCHLIST_VARIABLE}`, else
  `$CKPTFLOW_WATCHLIST`, else `dags/watchlist.yaml`. Format: `dags/watchlist.example.yaml`.
* **State**: the Airflow Variable `{STATE_VARIABLE}` (the sha last started per repo and target), written only
  after the triggers went through. Run ids are `watch__<org>--<name>__<sha12>__<target>`: even without the
  state, the same conversion is never started twice (an existing run is skipped).
* **Rate limits**: HTTP 429 is retried with backoff (Retry-After honoured); a still-limited hub fails the
  task, which retries later. Token: the Airflow connection `{HF_CONN_ID}` (password or extra `token`), else
  `HF_TOKEN`.
"""


def _hf_token() -> str | None:
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(HF_CONN_ID)
    except Exception:  # no connection: public repos need no token (HF_TOKEN is used when set)
        return None
    token = conn.password or (conn.extra_dejson or {}).get("token")
    if token:
        from airflow.sdk.log import mask_secret

        mask_secret(token)
    return token or None


def _watchlist_path(param: str | None) -> str:
    from airflow.sdk import Variable

    return (
        param
        or Variable.get(WATCHLIST_VARIABLE, default=None)
        or os.environ.get("CKPTFLOW_WATCHLIST")
        or str(DEFAULT_WATCHLIST)
    )


with DAG(
    dag_id=DAG_ID,
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={
        "watchlist": Param(
            "",
            type="string",
            title="Watch list",
            description=f"Path of the watch list YAML; empty: the Variable `{WATCHLIST_VARIABLE}`, "
            f"`$CKPTFLOW_WATCHLIST` or dags/watchlist.yaml.",
        ),
    },
    doc_md=DOC,
    description="Start convert_checkpoint for new Hugging Face repos and commits named by a watch list",
    tags=["ckptflow"],
) as dag:

    @task(
        retries=3,
        retry_delay=timedelta(minutes=2),
        retry_exponential_backoff=2.0,
        max_retry_delay=timedelta(minutes=30),
    )
    def find_new_releases(params=None) -> list[dict]:
        """Poll the hub; return one trigger (run id + conf) per (repo, commit, target) not started yet."""
        import logging

        from airflow.sdk import Variable

        from operators import watch

        log = logging.getLogger("airflow.task")
        path = _watchlist_path((params or {}).get("watchlist"))
        if path == str(DEFAULT_WATCHLIST) and not DEFAULT_WATCHLIST.exists():
            log.warning(
                "no watch list configured (param, Variable %s, $CKPTFLOW_WATCHLIST or %s): nothing to watch",
                WATCHLIST_VARIABLE,
                DEFAULT_WATCHLIST,
            )
            return []
        entries = watch.load_watchlist(path)
        state = json.loads(Variable.get(STATE_VARIABLE, default="{}") or "{}")
        found = watch.poll(entries, token=_hf_token())
        triggers = [t.as_dict() for t in watch.plan(found, state)]
        log.info(
            "%s: %d watched entries, %d releases seen, %d new conversions to start",
            path,
            len(entries),
            len(found),
            len(triggers),
        )
        for t in triggers:
            log.info("new: %s@%s -> %s (run %s)", t["repo_id"], t["sha"], t["conf"]["destination"], t["trigger_run_id"])
        return triggers

    @task(trigger_rule="none_failed")
    def record_state(triggered: list[dict]) -> int:
        """After every trigger went through (or found its run already there): remember the shas."""
        from airflow.sdk import Variable

        from operators import watch

        state = json.loads(Variable.get(STATE_VARIABLE, default="{}") or "{}")
        Variable.set(STATE_VARIABLE, json.dumps(watch.record(state, triggered), sort_keys=True))
        return len(triggered)

    found = find_new_releases()
    start = TriggerDagRunOperator.partial(
        task_id="trigger_convert",
        trigger_dag_id=CONVERT_DAG_ID,
        skip_when_already_exists=True,  # the run id names (repo, sha, target): never twice
        wait_for_completion=False,
        retries=2,
    ).expand_kwargs(found.map(lambda t: {"trigger_run_id": t["trigger_run_id"], "conf": t["conf"]}))
    start >> record_state(found)

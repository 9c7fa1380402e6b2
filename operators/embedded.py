"""The embedded default: Airflow on SQLite with the LocalExecutor in a folder of its own.

`configure(home)` sets the environment (before Airflow is imported: Airflow reads its configuration once, at
import) and `migrate()` creates the database. Used by `scripts/demo.py` and by the Airflow test suites.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DAGS_FOLDER = REPO / "dags"
PLUGINS_FOLDER = REPO / "plugins"


def environment(home: Path, *, dags_folder: Path = DAGS_FOLDER, parallelism: int = 4) -> dict[str, str]:
    """Environment variables of an isolated Airflow home (SQLite, LocalExecutor, OpenLineage to a file)."""
    home = Path(home).absolute()
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(parallelism),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "ckptflow",
        # Emit task events from a thread, not a fork of the task process (which may hold JAX/torch threads).
        "AIRFLOW__OPENLINEAGE__EXECUTE_IN_THREAD": "True",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(home / "openlineage-events.jsonl"), "append": True}
        ),
        "CKPTFLOW_WORK_ROOT": str(home / "ckptflow-work"),
    }


def configure(home: Path, **kwargs) -> dict[str, str]:
    """Point this process (and its children) at `home`; must run before `airflow` is imported."""
    env = environment(home, **kwargs)
    if "airflow" in sys.modules and os.environ.get("AIRFLOW_HOME") != env["AIRFLOW_HOME"]:
        raise RuntimeError("configure() must run before airflow is imported (Airflow reads its settings at import)")
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return env


_migrated: set[str] = set()


def migrate() -> None:
    """Create or upgrade the metadata database of the configured home (in-process, a few seconds; once)."""
    home = os.environ.get("AIRFLOW_HOME", "")
    if home in _migrated:
        return
    from airflow.utils.db import initdb

    initdb()
    _migrated.add(home)


def ol_events(home: Path) -> list[dict]:
    """The OpenLineage events written so far (one JSON object per line)."""
    path = Path(home) / "openlineage-events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_TEST_HOME_VAR = "CKPTFLOW_TEST_AIRFLOW_HOME"


def session_home(prefix: str = "ckptflow-airflow-") -> Path:
    """A throwaway Airflow home for this process, configured on first use (test suites share it)."""
    import atexit
    import shutil
    import tempfile

    existing = os.environ.get(_TEST_HOME_VAR)
    if existing and os.environ.get("AIRFLOW_HOME") == existing:
        return Path(existing)
    home = Path(tempfile.mkdtemp(prefix=prefix))
    configure(home)
    os.environ[_TEST_HOME_VAR] = str(home)
    atexit.register(shutil.rmtree, home, True)
    return home

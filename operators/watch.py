"""The release watcher's logic (the `watch_hf_releases` DAG): watch list, hub polling, what is new, the conf to send.

No Airflow import here, and nothing heavy at import time (the DAG file imports this module when it is parsed).

Watch list (YAML):

    defaults:                                  # merged into every target below (all optional but destination)
      destination: "gs://my-bucket/maxtext/{name}/{layout}-{dtype}/{sha12}"
      scan: true
      dtype: bfloat16
    watch:
      - repo: Qwen/Qwen3-0.6B                  # one repo; follows `revision` (default main)
        model: qwen3-0.6b
      - author: meta-llama                     # every repo of an author whose name matches `match`
        match: "Llama-3.1-*B-Instruct"
        since: "2026-01-01"                    # only repos created on/after this date (default: all)
        limit: 50                              # newest N repos looked at per poll (default 100)
        targets:                               # several outputs per release
          - {scan: true}
          - {scan: false, dtype: float32, destination: "file:///models/{repo}/{sha}/unscanned"}

Target keys are `convert_checkpoint` params: model, scan, dtype, destination, max_kl, execution_mode, node_pool
(direction is hf-to-maxtext: what comes from the hub is HF safetensors). A destination is a template with
{repo} {org} {name} {sha} {sha12} {layout} {dtype} {model}.

State: for every (repo, target) the commit sha last triggered, kept by the DAG in an Airflow Variable. A
release is new when its sha differs from that one (a new repo has none). Each trigger has a run id made of the
repo, the sha and the target, so even with the state lost the same conversion is never started twice.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from converters.core.direction import Direction
from operators.commands import AUTO_MODEL, DESTINATION_PATTERN, RunSpec

log = logging.getLogger("ckptflow.watch")

TARGET_KEYS = ("model", "scan", "dtype", "destination", "max_kl", "execution_mode", "node_pool")
ENTRY_KEYS = ("repo", "author", "match", "revision", "since", "limit", "targets", *TARGET_KEYS)
DEFAULT_LIMIT = 100
RUN_ID_PREFIX = "watch"
# list_models/model_info fields the watcher asks for (one request per author or repo per poll).
EXPAND = ["sha", "lastModified", "createdAt", "gated", "private", "siblings"]


class WatchlistError(ValueError):
    pass


@dataclass(frozen=True)
class Entry:
    repo: str | None
    author: str | None
    match: str
    revision: str
    since: datetime.datetime | None
    limit: int
    targets: tuple[dict, ...]

    @property
    def label(self) -> str:
        return self.repo or f"{self.author}/{self.match}"


@dataclass(frozen=True)
class Release:
    repo_id: str
    sha: str
    revision: str
    gated: Any = False
    files: tuple[str, ...] | None = None


@dataclass
class Trigger:
    key: str
    repo_id: str
    sha: str
    run_id: str
    conf: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "key": self.key,
            "repo_id": self.repo_id,
            "sha": self.sha,
            "trigger_run_id": self.run_id,
            "conf": self.conf,
        }


# -------------------------------------------------------------------------------------------- watch list


def _date(value, where: str) -> datetime.datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, datetime.datetime):
        d = value
    elif isinstance(value, datetime.date):
        d = datetime.datetime(value.year, value.month, value.day)
    else:
        try:
            d = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            raise WatchlistError(f"{where}: since {value!r} is not a date (YYYY-MM-DD)") from None
    return d if d.tzinfo else d.replace(tzinfo=datetime.timezone.utc)


def parse_watchlist(data: Any, source: str = "watch list") -> list[Entry]:
    """Check and normalise a parsed watch list; errors name the entry."""
    from converters.remote.hub import is_repo_id

    if not isinstance(data, dict) or not isinstance(data.get("watch"), list) or not data["watch"]:
        raise WatchlistError(f"{source}: needs a non-empty `watch:` list")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - set(TARGET_KEYS):
        raise WatchlistError(f"{source}: `defaults` takes only {', '.join(TARGET_KEYS)}")
    entries = []
    for i, raw in enumerate(data["watch"]):
        where = f"{source}: watch[{i}]"
        if not isinstance(raw, dict):
            raise WatchlistError(f"{where}: must be a mapping with `repo:` or `author:`")
        unknown = set(raw) - set(ENTRY_KEYS)
        if unknown:
            raise WatchlistError(f"{where}: unknown keys {sorted(unknown)} (allowed: {', '.join(ENTRY_KEYS)})")
        repo, author = raw.get("repo"), raw.get("author")
        if bool(repo) == bool(author):
            raise WatchlistError(f"{where}: give exactly one of `repo: org/name` or `author: org`")
        if repo and not is_repo_id(str(repo)):
            raise WatchlistError(f"{where}: {repo!r} is not a Hugging Face repo id (org/name)")
        if author and not re.fullmatch(r"[A-Za-z0-9][\w.-]*", str(author)):
            raise WatchlistError(f"{where}: {author!r} is not a hub user or organisation name")
        base = {**defaults, **{k: raw[k] for k in TARGET_KEYS if k in raw}}
        targets = raw.get("targets") or [{}]
        if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
            raise WatchlistError(f"{where}: `targets` must be a list of mappings")
        merged = []
        for j, t in enumerate(targets):
            if set(t) - set(TARGET_KEYS):
                raise WatchlistError(f"{where}.targets[{j}]: unknown keys {sorted(set(t) - set(TARGET_KEYS))}")
            target = {**base, **t}
            if not target.get("destination"):
                raise WatchlistError(f"{where}: no destination (set one in the entry, its targets or `defaults`)")
            _check_target(target, f"{where}" + (f".targets[{j}]" if raw.get("targets") else ""))
            merged.append(target)
        limit = raw.get("limit", DEFAULT_LIMIT)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise WatchlistError(f"{where}: limit must be an integer from 1 to 1000")
        entries.append(
            Entry(
                repo=str(repo) if repo else None,
                author=str(author) if author else None,
                match=str(raw.get("match") or "*"),
                revision=str(raw.get("revision") or "main"),
                since=_date(raw.get("since"), where),
                limit=limit,
                targets=tuple(merged),
            )
        )
    return entries


def _check_target(target: dict, where: str) -> None:
    """The target as the convert DAG would see it, with a made-up repo and sha (checks params early)."""
    from converters.core.registry import model_names

    model = target.get("model", AUTO_MODEL)
    if model != AUTO_MODEL and model not in model_names():
        raise WatchlistError(f"{where}: unknown model {model!r} (see `ckptflow models`, or use auto)")
    try:
        conf = build_conf("org/name", "0" * 40, target)
        RunSpec.from_params(conf)
    except (ValueError, KeyError, TypeError) as e:
        raise WatchlistError(f"{where}: {e}") from None


def load_watchlist(path: str | Path) -> list[Entry]:
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise WatchlistError(f"{path}: watch list not found") from None
    except yaml.YAMLError as e:
        raise WatchlistError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_watchlist(data, str(path))


# ----------------------------------------------------------------------------------------------- targets


def target_id(target: dict) -> str:
    return hashlib.sha256(json.dumps(target, sort_keys=True, default=str).encode()).hexdigest()[:8]


def render_destination(template: str, repo_id: str, sha: str, target: dict) -> str:
    org, name = repo_id.split("/", 1)
    fields = {
        "repo": repo_id,
        "org": org,
        "name": name,
        "sha": sha,
        "sha12": sha[:12],
        "layout": "scanned" if target.get("scan", True) else "unscanned",
        "dtype": target.get("dtype", "bfloat16"),
        "model": target.get("model", AUTO_MODEL),
    }
    try:
        out = template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(
            f"destination {template!r}: unknown placeholder {e} (use {', '.join('{' + k + '}' for k in fields)})"
        ) from None
    if not re.fullmatch(DESTINATION_PATTERN, out):
        raise ValueError(
            f"destination {out!r} (from {template!r}) is not a file:///path, gs://bucket/prefix or hf://org/name URI"
        )
    return out


def build_conf(repo_id: str, sha: str, target: dict) -> dict:
    """The `convert_checkpoint` run conf for one release and target: the source pinned to the commit sha."""
    conf = {"source": repo_id, "revision": sha, "direction": Direction.TO_MAXTEXT.param}
    for k in TARGET_KEYS:
        if k in target and k != "destination":
            conf[k] = target[k]
    conf["destination"] = render_destination(str(target["destination"]), repo_id, sha, target)
    return conf


def run_id(repo_id: str, sha: str, target: dict) -> str:
    """Deterministic and within Airflow's run id characters: `watch__org--name__<sha12>__<target>`."""
    safe = re.sub(r"[^A-Za-z0-9_.~:+-]", "-", repo_id.replace("/", "--"))
    return f"{RUN_ID_PREFIX}__{safe}__{sha[:12]}__{target_id(target)}"


def state_key(repo_id: str, target: dict) -> str:
    return f"{repo_id}#{target_id(target)}"


# ------------------------------------------------------------------------------------------------ polling


def _convertible(release: Release) -> bool:
    return release.files is None or any(f.endswith(".safetensors") for f in release.files)


def poll(entries: Iterable[Entry], token: str | None = None) -> list[tuple[Entry, Release]]:
    """The current release (commit sha) of every watched repo. Rate limits are retried (converters.remote.hub.call);
    a repo that vanished or is not readable is logged and skipped, not fatal for the others."""
    from converters.errors import CkptflowError
    from converters.remote import hub

    api = hub.api(token)
    out: list[tuple[Entry, Release]] = []
    for e in entries:
        if e.repo:
            try:
                info = hub.call(
                    api.model_info,
                    e.repo,
                    revision=None if e.revision == "main" else e.revision,
                    expand=EXPAND,
                    what=f"{e.repo}: model_info",
                )
            except Exception as err:
                if hub.retryable(err):
                    raise  # the hub is down or still rate limiting: the task retries later
                log.warning(
                    "skipping %s: %s", e.label, hub.explain(err, e.repo, e.revision, token_given=bool(token) or None)
                )
                continue
            found = [info]
        else:
            try:
                found = hub.call(
                    lambda e=e: list(api.list_models(author=e.author, sort="created_at", limit=e.limit, expand=EXPAND)),
                    what=f"{e.author}: list_models",
                )
            except CkptflowError:
                raise
            found = [m for m in found if fnmatch.fnmatchcase(m.id.split("/", 1)[1], e.match)]
            if e.since is not None:
                found = [m for m in found if m.created_at is None or m.created_at >= e.since]
        for m in found:
            if not m.sha:
                log.warning("skipping %s: the hub gave no commit sha", m.id)
                continue
            files = tuple(s.rfilename for s in m.siblings) if m.siblings is not None else None
            rel = Release(m.id, m.sha, e.revision, getattr(m, "gated", False), files)
            if not _convertible(rel):
                log.info("skipping %s@%s: no *.safetensors weights", m.id, m.sha[:12])
                continue
            out.append((e, rel))
    return out


def plan(found: Iterable[tuple[Entry, Release]], state: dict) -> list[Trigger]:
    """One trigger per (release, target) whose sha was not triggered before; each run id once."""
    triggers: dict[str, Trigger] = {}
    for entry, rel in found:
        for target in entry.targets:
            key = state_key(rel.repo_id, target)
            if (state.get(key) or {}).get("sha") == rel.sha:
                continue
            rid = run_id(rel.repo_id, rel.sha, target)
            if rid not in triggers:
                triggers[rid] = Trigger(key, rel.repo_id, rel.sha, rid, build_conf(rel.repo_id, rel.sha, target))
    return list(triggers.values())


def record(state: dict, triggered: Iterable[dict], now: str | None = None) -> dict:
    """The state after `triggered` (Trigger.as_dict() items) were sent."""
    now = now or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    new = dict(state)
    for t in triggered:
        new[t["key"]] = {"sha": t["sha"], "run_id": t["trigger_run_id"], "triggered_at": now}
    return new

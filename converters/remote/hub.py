"""Hugging Face hub transport: repo ids, revisions pinned to commit shas, verified downloads, one-commit uploads.

Everything goes through the `huggingface_hub` client, pointed at `$HF_ENDPOINT` when set (a mirror, or the
test stand-in). The token comes from `HF_TOKEN` (the Airflow operators fill it from the `ckptflow_hf`
connection) and is never printed: errors are turned into one line that names the repo and what to do.

Rate limits: `call` retries HTTP 429 (and 5xx, connection errors) with exponential backoff, waiting what the
hub's `Retry-After` / `RateLimit` headers ask for when they say, and gives up after `RETRIES` tries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from converters.errors import CkptflowError
from converters.io import direct_io

log = logging.getLogger("ckptflow.hub")
T = TypeVar("T")

# `org/name`: what the hub accepts (letters, digits, `-`, `_`, `.`; no `--`/`..`; at most 96 characters).
REPO_ID = re.compile(r"^[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?$")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
RETRIES = 6
BACKOFF_BASE = 2.0  # seconds; doubled each try, with jitter, capped at BACKOFF_MAX
BACKOFF_MAX = 120.0
DOWNLOAD_WORKERS = 8
TOKEN_HELP = "set HF_TOKEN (or the Airflow connection `ckptflow_hf`) to a token with read access"


def is_repo_id(text: str) -> bool:
    return bool(REPO_ID.match(text)) and "--" not in text and ".." not in text


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """`hf://org/name[@revision]` -> (repo id, revision or None). A prefix is removed, never a character set
    (MaxText's `lstrip("hf://")` turns `hf://facebook/opt` into `acebook/opt`)."""
    if not uri.startswith("hf://"):
        raise CkptflowError(f"{uri}: not an hf:// URI")
    rest = uri.removeprefix("hf://").rstrip("/")
    repo_id, _, revision = rest.partition("@")
    if not is_repo_id(repo_id):
        raise CkptflowError(f"{uri}: {repo_id!r} is not a Hugging Face repo id (hf://org/name)")
    return repo_id, revision or None


def endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or None


def api(token: str | None = None):
    """An `HfApi` for `$HF_ENDPOINT` (token: the argument, else `HF_TOKEN` / the saved login)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=token)


# ------------------------------------------------------------------------------------------ errors, retries


def _status(e: BaseException) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _wait_asked(e: BaseException) -> float | None:
    """Seconds the hub asked us to wait (Retry-After, or RateLimit `t=` when nothing remains)."""
    headers = getattr(getattr(e, "response", None), "headers", None) or {}
    try:
        from huggingface_hub.utils._http import parse_ratelimit_headers

        info = parse_ratelimit_headers(headers)
        if info is not None and info.remaining == 0:
            return float(info.reset_in_seconds)
    except Exception:  # older/newer client without the helper: Retry-After only
        pass
    value = headers.get("Retry-After")
    return float(value) if value and value.strip().isdigit() else None


def retryable(e: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        import httpx2 as httpx
    except ImportError:  # pragma: no cover - older clients use httpx
        import httpx
    if isinstance(e, (httpx.ConnectError, httpx.TimeoutException, httpx.RemoteProtocolError)):
        return True
    return isinstance(e, HfHubHTTPError) and _status(e) in (429, 500, 502, 503, 504)


def call(fn: Callable[..., T], *args, retries: int | None = None, what: str = "hub request", **kwargs) -> T:
    """`fn(*args, **kwargs)`, retried with backoff on rate limits (429), 5xx and connection errors."""
    tries = RETRIES if retries is None else retries
    delay = BACKOFF_BASE
    for attempt in range(1, tries + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if attempt == tries or not retryable(e):
                raise
            asked = _wait_asked(e)
            wait = min(BACKOFF_MAX, asked if asked is not None else delay * (0.5 + random.random()))
            reason = (
                "rate limited (HTTP 429)" if _status(e) == 429 else f"{type(e).__name__} {_status(e) or ''}".strip()
            )
            log.warning("%s: %s; retrying in %.1f s (try %d of %d)", what, reason, wait, attempt + 1, tries)
            time.sleep(wait)
            delay = min(BACKOFF_MAX, delay * 2)
    raise AssertionError("unreachable")


def explain(
    e: BaseException, repo_id: str, revision: str | None = None, *, write: bool = False, token_given: bool | None = None
) -> CkptflowError:
    """One line saying what went wrong with `repo_id` and what to do (never the token, never a traceback)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    has_token = bool(os.environ.get("HF_TOKEN")) if token_given is None else token_given
    if isinstance(e, GatedRepoError):
        return CkptflowError(
            f"{repo_id} is a gated repo: accept its terms at https://huggingface.co/{repo_id} with your account, then "
            f"{TOKEN_HELP.replace('read access', 'read access for that account')}"
        )
    if isinstance(e, RevisionNotFoundError):
        return CkptflowError(
            f"{repo_id}: revision {revision!r} not found (a branch, tag or 40-hex commit sha of the repo)"
        )
    if isinstance(e, RepositoryNotFoundError):
        if has_token:
            return CkptflowError(f"{repo_id}: repository not found, or private and the token given cannot read it")
        return CkptflowError(f"{repo_id}: repository not found, or private/gated and no token was given: {TOKEN_HELP}")
    status = _status(e)
    if status in (401, 403):
        need = "write access" if write else "read access"
        return CkptflowError(
            f"{repo_id}: the hub refused access (HTTP {status}): {TOKEN_HELP.replace('read access', need)}"
        )
    if status == 429:
        return CkptflowError(
            f"{repo_id}: still rate limited by the hub after {RETRIES} tries (HTTP 429); pass HF_TOKEN "
            "(anonymous quotas are the lowest) or try again later"
        )
    if isinstance(e, HfHubHTTPError):
        return CkptflowError(f"{repo_id}: hub request failed: {str(e).strip().splitlines()[0]}")
    return CkptflowError(
        f"{repo_id}: cannot reach the hub ({endpoint() or 'https://huggingface.co'}): {type(e).__name__}: {e}"
    )


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class RemoteFile:
    size: int | None
    sha256: str | None  # LFS files: the sha256 the hub stores (what the client's ETag also is)
    git_oid: str | None  # git blob id: sha1("blob <size>\0" + content), known for every file


@dataclass(frozen=True)
class Snapshot:
    repo_id: str
    sha: str
    files: dict[str, RemoteFile]


def snapshot(repo_id: str, revision: str | None = None) -> Snapshot:
    """The commit `revision` (default: main) resolves to, and its files with sizes and digests."""
    if not is_repo_id(repo_id):
        raise CkptflowError(f"{repo_id!r}: not a Hugging Face repo id (org/name)")
    try:
        info = call(api().model_info, repo_id, revision=revision, files_metadata=True, what=f"{repo_id}: model_info")
    except Exception as e:
        if isinstance(e, CkptflowError):
            raise
        raise explain(e, repo_id, revision) from None
    if not info.sha or not COMMIT_SHA.match(info.sha):
        raise CkptflowError(f"{repo_id}: the hub gave no commit sha for revision {revision or 'main'!r}")
    files = {}
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        sha256 = (lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)) if lfs else None
        files[s.rfilename] = RemoteFile(s.size, sha256, getattr(s, "blob_id", None))
    return Snapshot(repo_id, info.sha, files)


def git_blob_oid(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    for block in direct_io.read_blocks(path):
        h.update(block)
    return h.hexdigest()


def check_file(path: Path, remote: RemoteFile, sha256: str) -> str | None:
    """Why `path` (whose sha256 is given) is not the hub's file, or None when it is."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"size {size} != {remote.size} on the hub"
    if remote.sha256:
        return None if sha256 == remote.sha256 else f"sha256 {sha256} != {remote.sha256} on the hub"
    if remote.git_oid:
        oid = git_blob_oid(path)
        return None if oid == remote.git_oid else f"git blob id {oid} != {remote.git_oid} on the hub"
    return None


def download_files(
    snap: Snapshot,
    names: Iterable[str],
    local_dir: Path,
    workers: int = DOWNLOAD_WORKERS,
    on_file: Callable[[str, Path], None] | None = None,
) -> None:
    """Download `names` of the pinned commit into `local_dir`, `workers` files at a time.

    Files already complete in `local_dir` from an earlier (interrupted) call for the same commit are kept (the
    client's `.cache/huggingface` metadata says so) and not fetched again. `on_file(name, path)` runs as each
    file lands (it checks the file and raises to stop).
    """
    from huggingface_hub import hf_hub_download

    def one(name: str) -> None:
        try:
            path = call(
                hf_hub_download,
                snap.repo_id,
                name,
                revision=snap.sha,
                local_dir=local_dir,
                endpoint=endpoint(),
                what=f"{snap.repo_id}: {name}",
            )
        except Exception as e:
            if isinstance(e, CkptflowError):
                raise
            raise explain(e, snap.repo_id, snap.sha) from None
        if on_file is not None:
            on_file(name, Path(path))

    names = list(names)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(names) or 1)), thread_name_prefix="hub-dl") as pool:
        futures = [pool.submit(one, n) for n in names]
        errors = []
        for f in futures:
            try:
                f.result()
            except BaseException as e:  # let every started file finish or fail; report the first problem
                errors.append(e)
        if errors:
            raise errors[0]


# ------------------------------------------------------------------------------------------------ writing


def read_file(repo_id: str, filename: str, revision: str | None = None) -> bytes | None:
    """One small file of a repo (None when the repo or file does not exist)."""
    import tempfile

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    with tempfile.TemporaryDirectory(prefix="ckptflow-hub-") as tmp:
        try:
            path = call(
                hf_hub_download,
                repo_id,
                filename,
                revision=revision,
                local_dir=tmp,
                endpoint=endpoint(),
                what=f"{repo_id}: {filename}",
            )
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            return None
        except Exception as e:
            if isinstance(e, CkptflowError):
                raise
            raise explain(e, repo_id, revision) from None
        return Path(path).read_bytes()


def commit_folder(
    repo_id: str,
    files: dict[str, Path],
    extra: dict[str, bytes],
    *,
    private: bool,
    message: str,
    description: str = "",
    delete: Iterable[str] = (),
) -> tuple[str, str]:
    """Create the repo if needed and upload `files` (+ `extra` contents) in ONE commit; returns (commit sha, url)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    hub = api()
    try:
        call(hub.create_repo, repo_id, private=private, exist_ok=True, what=f"{repo_id}: create_repo")
        ops = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p)) for rel, p in sorted(files.items())]
        ops += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=data) for rel, data in sorted(extra.items())]
        ops += [CommitOperationDelete(path_in_repo=rel) for rel in sorted(delete)]
        # Retried like every other request (429, 5xx, connection errors): a commit the hub refused changed nothing.
        info = call(
            hub.create_commit,
            repo_id,
            ops,
            commit_message=message,
            commit_description=description,
            what=f"{repo_id}: create_commit",
        )
    except Exception as e:
        if isinstance(e, CkptflowError):
            raise
        raise explain(e, repo_id, write=True) from None
    return info.oid, f"{hub.endpoint}/{repo_id}/tree/{info.oid}"


def list_files(repo_id: str, revision: str | None = None) -> list[str]:
    try:
        info = call(api().model_info, repo_id, revision=revision, what=f"{repo_id}: model_info")
    except Exception as e:
        from huggingface_hub.errors import RepositoryNotFoundError

        if isinstance(e, RepositoryNotFoundError):
            return []
        raise explain(e, repo_id, revision) from None
    return sorted(s.rfilename for s in info.siblings or [])

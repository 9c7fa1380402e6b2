"""Google Cloud Storage transport for `ckptflow publish SRC gs://bucket/prefix`.

GCS has no atomic folder rename, so "published" is defined by a marker object written last:

    gs://bucket/prefix/...                           the checkpoint's files
    gs://bucket/prefix/ckptflow-published.json       the marker: digest, files (size, sha256), source; last

1. The files are uploaded (resumable uploads, several at a time, crc32c-checked by the client) under a staging
   prefix beside the destination, `gs://bucket/.prefix.ckptflow-staging-<digest12>/`: a reader looking at
   `prefix/` sees nothing of an upload in progress or interrupted. Each staged object carries the file's
   sha256 in its metadata, so a rerun after an interruption uploads only what is missing.
2. The staged objects are copied server-side (rewrite) to `prefix/`, then the marker is written with
   `ifGenerationMatch=0` (no other publisher can have written one meanwhile), then staging is deleted.

Readers (ckptflow, the pipeline, the watcher) treat a prefix without the marker as not published. A prefix
that holds a marker for other content is refused unless `force`; then the old marker is deleted first (the
version reads as absent while it is replaced), the new files copied, old files not in the new version deleted,
and the new marker written. Credentials: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, or
Workload Identity on GKE); `STORAGE_EMULATOR_HOST` points the client at an emulator (anonymous).
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from converters.errors import CkptflowError, OutputExistsError

log = logging.getLogger("ckptflow.gcs")

MARKER = "ckptflow-published.json"
STAGING_MARK = ".ckptflow-staging-"
CHUNK_BYTES = 32 << 20  # resumable upload chunk (a multiple of 256 KiB)
WORKERS = 8
SHA_KEY = "ckptflow-sha256"
VERSION_KEY = "ckptflow-version"
BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """`gs://bucket/prefix` -> (bucket, prefix without slashes at either end); the prefix is required."""
    if not uri.startswith("gs://"):
        raise CkptflowError(f"{uri}: not a gs:// URI")
    bucket, _, prefix = uri.removeprefix("gs://").partition("/")
    prefix = prefix.strip("/")
    if not BUCKET.match(bucket):
        raise CkptflowError(f"{uri}: {bucket!r} is not a valid bucket name")
    if not prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
        raise CkptflowError(f"{uri}: name a folder in the bucket for this version (gs://bucket/path/to/version)")
    return bucket, prefix


def staging_prefix(prefix: str, digest: str) -> str:
    parent, _, name = prefix.rpartition("/")
    tag = digest.removeprefix("sha256:")[:12]
    return f"{parent + '/' if parent else ''}.{name}{STAGING_MARK}{tag}"


def client():
    try:
        from google.cloud import storage
    except ImportError:
        raise CkptflowError(
            "publishing to gs:// needs google-cloud-storage (pip install google-cloud-storage)"
        ) from None
    try:
        return storage.Client()
    except Exception as e:  # google.auth DefaultCredentialsError and friends
        raise CkptflowError(
            f"no Google Cloud credentials ({type(e).__name__}): set GOOGLE_APPLICATION_CREDENTIALS to a key file, run "
            "with Workload Identity, or set the Airflow connection `ckptflow_gcp`"
        ) from None


def _explain(e: Exception, uri: str) -> CkptflowError:
    from google.api_core import exceptions as gexc

    if isinstance(e, gexc.NotFound):
        return CkptflowError(f"{uri}: not found (does the bucket exist?): {e.message if hasattr(e, 'message') else e}")
    if isinstance(e, (gexc.Forbidden, gexc.Unauthorized)):
        return CkptflowError(
            f"{uri}: access denied ({type(e).__name__}): the credentials need storage.objects.create/get/delete on "
            f"the bucket"
        )
    return CkptflowError(f"{uri}: GCS request failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def read_marker(uri: str) -> dict | None:
    """The marker of the version at `uri` (None when nothing is published there)."""
    bucket_name, prefix = parse_gs_uri(uri)
    blob = client().bucket(bucket_name).get_blob(f"{prefix}/{MARKER}")
    return json.loads(blob.download_as_bytes()) if blob is not None else None


RETRY_SECONDS = 300.0  # one request is retried (429, 5xx, connection errors) with backoff for this long, then fails
RETRY_INITIAL = 1.0  # first wait, doubled each try up to a minute


def _retry():
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_timeout(RETRY_SECONDS).with_delay(initial=RETRY_INITIAL, maximum=60.0)


def _upload_one(bucket, name: str, path: Path, sha256: str, version: str) -> None:
    blob = bucket.blob(name, chunk_size=CHUNK_BYTES)
    blob.metadata = {SHA_KEY: sha256, VERSION_KEY: version}
    blob.upload_from_filename(str(path), content_type="application/octet-stream", checksum="crc32c", retry=_retry())


def _copy_one(bucket, src_name: str, dst_name: str) -> None:
    src = bucket.blob(src_name)
    dst = bucket.blob(dst_name)
    # The client retries a rewrite only when a generation precondition is given; copying the same staged object
    # onto the same name again is harmless, so 429/5xx/connection errors are retried with backoff here too.
    token, _, _ = dst.rewrite(src, retry=_retry())
    while token is not None:  # large objects across storage classes/locations take several calls
        token, _, _ = dst.rewrite(src, token=token, retry=_retry())


def _delete(blob) -> None:
    from google.api_core import exceptions as gexc

    try:
        blob.delete()
    except gexc.NotFound:  # already gone (a concurrent cleanup): fine
        pass


def _parallel(fn: Callable, jobs: list[tuple], workers: int) -> None:
    if not jobs:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs))), thread_name_prefix="gcs") as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        errors = []
        for f in futures:
            try:
                f.result()
            except BaseException as e:
                errors.append(e)
        if errors:
            raise errors[0]


def publish_folder(
    src: Path,
    uri: str,
    files: dict[str, dict],
    *,
    version: str,
    record: dict,
    force: bool = False,
    workers: int = WORKERS,
) -> tuple[str, dict | None]:
    """Publish `files` ({rel: {"size", "sha256"}}) of `src` at `uri`; `version` identifies the content.

    Returns (status, the marker found) with status "published", "replaced" or "unchanged".
    """
    from google.api_core import exceptions as gexc

    bucket_name, prefix = parse_gs_uri(uri)
    gcs = client()
    bucket = gcs.bucket(bucket_name)
    final = f"{prefix}/"
    try:
        marker_blob = bucket.get_blob(final + MARKER)
        existing = json.loads(marker_blob.download_as_bytes()) if marker_blob is not None else None
        status = "published"
        if existing is not None:
            if existing.get("version") == version:
                return "unchanged", existing
            if not force:
                raise OutputExistsError(
                    f"{uri}: already holds a different version ({existing.get('version')}, publishing {version}); "
                    "pick a new destination or pass --force to replace it"
                )
            status = "replaced"
        present = {b.name[len(final) :]: b for b in gcs.list_blobs(bucket_name, prefix=final)}
        present.pop(MARKER, None)
        foreign = [n for n, b in present.items() if (b.metadata or {}).get(VERSION_KEY) != version]
        if existing is None and foreign and not force:
            raise OutputExistsError(
                f"{uri}: holds {len(present)} objects but no complete ckptflow version (no {MARKER}); "
                "pick a new destination or pass --force to replace them"
            )

        # 1. upload into staging, skipping what an interrupted run already staged
        staging = staging_prefix(prefix, version) + "/"
        staged = {b.name[len(staging) :]: b for b in gcs.list_blobs(bucket_name, prefix=staging)}
        todo = [
            (bucket, staging + rel, src / rel, meta["sha256"], version)
            for rel, meta in sorted(files.items())
            if not (
                rel in staged
                and staged[rel].size == meta["size"]
                and (staged[rel].metadata or {}).get(SHA_KEY) == meta["sha256"]
            )
        ]
        log.info("%s: uploading %d of %d files to staging %s", uri, len(todo), len(files), staging)
        _parallel(_upload_one, todo, workers)

        # 2. the version reads as absent while it changes, then copy, prune, mark
        if marker_blob is not None:
            marker_blob.delete()
        _parallel(_copy_one, [(bucket, staging + rel, final + rel) for rel in sorted(files)], workers)
        stale = [b for n, b in present.items() if n not in files]
        _parallel(_delete, [(b,) for b in stale], workers)
        marker = {
            **record,
            "version": version,
            "published_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        try:
            bucket.blob(final + MARKER).upload_from_string(
                json.dumps(marker, indent=2, sort_keys=True) + "\n",
                content_type="application/json",
                if_generation_match=0,
            )
        except gexc.PreconditionFailed:
            raise OutputExistsError(
                f"{uri}: another publisher wrote a version at the same time; nothing was marked"
            ) from None

        # 3. staging is garbage now (also what killed runs of other versions left for this destination)
        parent = prefix.rpartition("/")[0]
        lead = f"{parent + '/' if parent else ''}.{prefix.rpartition('/')[2]}{STAGING_MARK}"
        leftovers = list(gcs.list_blobs(bucket_name, prefix=lead))
        _parallel(_delete, [(b,) for b in leftovers], workers)
        return status, existing
    except CkptflowError:
        raise
    except Exception as e:
        if _transport_error(e):
            raise _explain(e, uri) from None
        raise


def _transport_error(e: Exception) -> bool:
    """Errors of GCS itself or of getting there (as opposed to bugs), turned into one-line messages."""
    import requests
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    kinds: tuple = (gexc.GoogleAPIError, auth_exc.GoogleAuthError, requests.RequestException)
    try:
        from google.resumable_media import common

        kinds += (common.InvalidResponse, common.DataCorruption)
    except ImportError:
        pass
    return isinstance(e, kinds)

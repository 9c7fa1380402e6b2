"""Publish a converted checkpoint folder to `file://`, `gs://bucket/prefix` or `hf://org/repo`.

Before anything is written, every file of SRC is checked against its lineage manifest (`ckptflow-manifest.json`,
`outputs`: size and BLAKE3 of every file): a missing, extra or changed file refuses the publish. The content's
identity is the manifest's `output_digest` (tensor-level, equal across re-runs of the same conversion), else
the digest of the folder's files.

* `file://` (or a plain path): copied to a temporary sibling, checked, renamed onto DEST (`atomic_dir`).
* `gs://`: `converters.remote.gcs` (staging prefix, server-side copy, marker object written last).
* `hf://org/repo`: the repo is created if needed (private unless `public`), and every file plus a model card
  (README.md: lineage and verify metrics) goes up in ONE commit. The id is parsed with `removeprefix`.

Every destination: the same content again is a no-op ("unchanged"); different content is refused unless
`force` ("replaced"). `verify_report` (a `ckptflow verify` verify.json) adds its metrics to the manifest first,
so they travel with the checkpoint and appear in the model card.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from converters import __version__
from converters.core.direction import Direction
from converters.errors import CkptflowError, OutputExistsError
from converters.io.files import copy_file, digest_of, iter_tree, read_json, tree_files
from converters.outputs.atomic import atomic_dir
from converters.outputs.hashing import CONTENT_HASH, file_digests
from converters.outputs.lock import destination_lock
from converters.outputs.manifest import MANIFEST, check_outputs, record_verify

SUPPORTED_SCHEMES = ("file", "gs", "hf")
_DIGESTS = ("sha256", CONTENT_HASH)
HUB_KEEP = (".gitattributes",)


def scheme_of(dest: str) -> str:
    scheme, sep, _ = dest.partition("://")
    if not sep:
        return "file"
    if scheme not in SUPPORTED_SCHEMES:
        raise CkptflowError(f"{dest}: unsupported destination scheme {scheme!r} (use file://, gs:// or hf://)")
    return scheme


def destination_path(dest: str) -> Path:
    """The local folder a `file://` URI (or plain path) names."""
    scheme, sep, rest = dest.partition("://")
    if not sep:
        return Path(dest).expanduser().absolute()
    if scheme_of(dest) != "file":
        raise CkptflowError(f"{dest}: not a local destination")
    if rest.startswith("localhost/"):
        rest = rest[len("localhost") :]
    if not rest.startswith("/"):
        raise CkptflowError(f"{dest}: a file:// destination needs an absolute path (file:///abs/path)")
    return Path(rest)


# The verdict (each part's pass/fail), the precision numbers and the layout check's KL of a verify report
VERIFY_KEYS = (
    "passed",
    "content_passed",
    "layout_passed",
    "precision_passed",
    "kl_max",
    "kl_mean",
    "layout_kl_max",
    "max_abs_logit_diff",
    "top10_overlap_min",
    "top10_jaccard_mean",
    "num_tokens",
)


def verify_summary(report: dict) -> dict:
    """The metrics of a `ckptflow verify` report worth keeping with the checkpoint."""
    s = report.get("summary") or {}
    out = {k: s[k] for k in VERIFY_KEYS if k in s}
    out["max_kl_threshold"] = s.get("max_kl_threshold", report.get("max_kl"))
    if report.get("dtype"):
        out["dtype"] = report["dtype"]
    return out


# -------------------------------------------------------------------------------------------- checking


def checked_source(src: Path, verify_report: str | os.PathLike | None = None) -> tuple[dict, dict[str, dict]]:
    """(manifest, files) of SRC after checking every file against the manifest; files: {rel: {size, sha256, blake3}}
    (sha256 for the destinations' records, BLAKE3 for the manifest's; one read of each file)."""
    if not src.is_dir():
        raise CkptflowError(f"{src}: no such folder to publish")
    manifest_path = src / MANIFEST
    if not manifest_path.is_file():
        raise CkptflowError(f"{src}: no {MANIFEST}; publish takes a folder written by `ckptflow convert`")
    report = read_json(Path(verify_report), "verify report") if verify_report else None
    manifest = read_json(manifest_path, "ckptflow manifest")
    files = tree_files(src, digests=_DIGESTS)
    if not files:
        raise CkptflowError(f"{src}: empty folder, nothing to publish")
    listed = manifest.get("outputs")
    if not isinstance(listed, dict) or not listed:
        raise CkptflowError(f"{src}: {MANIFEST} lists no output files (not a ckptflow output?)")
    problems = check_outputs(src, manifest, files)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CkptflowError(
            f"{src}: files no longer match {MANIFEST}: {'; '.join(problems[:3])}{more}; "
            "convert again instead of publishing a changed checkpoint"
        )
    if report is not None:  # the manifest is not among its own outputs: recording changes no checked file
        manifest = record_verify(src, verify_summary(report))
        files[MANIFEST] = {"size": manifest_path.stat().st_size, **file_digests(manifest_path, _DIGESTS)}
    return manifest, files


# ------------------------------------------------------------------------------------------ destinations


def _publish_local(src: Path, dest: str, files: dict, digest: str, version: str, force: bool) -> str:
    out = destination_path(dest)
    if out == src or src in out.parents or out in src.parents:
        raise CkptflowError(f"{dest}: the destination must not overlap the source folder {src}")
    # Locked from the look at DEST to the rename: a concurrent publish of the same DEST waits, then finds
    # this one's result (same content: "unchanged"; different: refused).
    with destination_lock(out):
        status = "published"
        if out.exists():
            if not out.is_dir():
                raise OutputExistsError(f"{dest}: exists and is not a folder")
            existing_files = tree_files(out, digests=_DIGESTS)
            existing = digest_of(existing_files)
            theirs = _local_version(out, existing_files)
            if existing == digest or theirs == version:
                return "unchanged"
            if not force:
                raise OutputExistsError(
                    f"{dest}: already holds a different version ({theirs or existing}, publishing {version}); "
                    "pick a new destination or pass --force to replace it"
                )
            status = "replaced"
        with atomic_dir(out, overwrite=force) as tmp:
            copied = {rel: {"size": p.stat().st_size, "sha256": copy_file(p, tmp / rel)} for rel, p in iter_tree(src)}
            if digest_of(copied) != digest:
                raise CkptflowError(f"{src}: changed while it was being published; try again")
    return status


def _local_version(folder: Path, files: dict[str, dict]) -> str | None:
    """The output_digest of a published folder, if its files still match its manifest."""
    try:
        m = read_json(folder / MANIFEST, "manifest")
    except CkptflowError:
        return None
    listed = m.get("outputs") or {}
    intact = set(listed) == set(files) - {MANIFEST} and all(
        (listed[r] or {}).get(algo) in (None, files[r][algo]) for r in listed for algo in _DIGESTS
    )
    return m.get("output_digest") if intact else None


def model_card(manifest: dict, repo_id: str, version: str) -> str:
    """README.md for a published repo: where the weights came from, how they were converted, how they scored."""
    src = manifest.get("source") or {}
    opts = manifest.get("options") or {}
    direction = manifest.get("direction", "")
    to_maxtext = Direction.from_record(direction) is Direction.TO_MAXTEXT
    lines = ["---"]
    if src.get("repo"):
        lines.append(f"base_model: {src['repo']}")
    lines += ["tags:", "- ckptflow", f"- {'maxtext' if to_maxtext else 'transformers'}"]
    if manifest.get("family"):
        lines.append(f"- {manifest['family']}")
    lines += ["---", "", f"# {repo_id.split('/')[-1]}", ""]
    origin = (
        f"[{src['repo']}](https://huggingface.co/{src['repo']})" if src.get("repo") else f"`{src.get('path', '?')}`"
    )
    at = f" at commit `{src['revision']}`" if src.get("revision") else ""
    lines += [
        f"Converted ({direction}) by ckptflow {manifest.get('ckptflow_version', __version__)} from {origin}{at}.",
        "",
    ]
    if to_maxtext:
        lines += [
            "Load it in MaxText with `load_parameters_path=<this checkpoint>/0/items` and "
            f"`scan_layers={str(bool(opts.get('scan_layers'))).lower()}`.",
            "",
        ]
    lines += ["## Lineage", "", "| | |", "|---|---|"]
    rows = [
        ("source", src.get("uri") or src.get("path")),
        ("source commit", src.get("revision")),
        (
            "source files",
            f"{len(src.get('files') or {})} (sha256 of each in `ckptflow-manifest.json`)" if src.get("files") else None,
        ),
        ("family", manifest.get("family")),
        ("direction", direction),
        ("options", ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or None),
        ("converter", f"ckptflow {manifest.get('ckptflow_version')}"),
        ("converted", manifest.get("created")),
        ("output digest", f"`{version}`"),
    ]
    lines += [f"| {k} | {v} |" for k, v in rows if v not in (None, "")]
    v = manifest.get("verify")
    lines += ["", "## Verification", ""]
    if v:
        verdict = "passed" if v.get("passed") else "FAILED"
        lines += [
            f"Logits compared with the source model ({v.get('num_tokens', '?')} tokens, {v.get('dtype', '?')}): "
            f"**{verdict}**.",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        for k in (
            "content_passed",
            "layout_passed",
            "layout_kl_max",
            "kl_max",
            "kl_mean",
            "max_kl_threshold",
            "max_abs_logit_diff",
            "top10_overlap_min",
            "top10_jaccard_mean",
        ):
            if k in v:
                lines.append(f"| {k} | {v[k]} |")
    else:
        lines.append("No verification metrics were recorded with this checkpoint.")
    lines += ["", "Every file's size and BLAKE3 digest are in `ckptflow-manifest.json`.", ""]
    return "\n".join(lines) + "\n"


def _publish_hub(
    src: Path, dest: str, manifest: dict, files: dict, version: str, force: bool, public: bool
) -> tuple[str, dict]:
    from converters.remote import hub

    repo_id, revision = hub.parse_hf_uri(dest)
    if revision:
        raise CkptflowError(f"{dest}: publish commits to the repo's main branch; drop '@{revision}'")
    existing_files = hub.list_files(repo_id)
    theirs = None
    if MANIFEST in existing_files:
        raw = hub.read_file(repo_id, MANIFEST)
        try:
            theirs = json.loads(raw or b"{}")
        except ValueError:
            theirs = {}
    status = "published"
    if theirs is not None:
        same = (
            theirs.get("output_digest") == version
            if theirs.get("output_digest")
            else (bool(theirs.get("outputs")) and theirs.get("outputs") == manifest.get("outputs"))
        )
        if same:
            return "unchanged", {"repo_id": repo_id}
        if not force:
            raise OutputExistsError(
                f"{dest}: already holds a different version ({theirs.get('output_digest')}, publishing "
                f"{version}); pick another repo or pass --force to commit over it"
            )
        status = "replaced"
    elif [f for f in existing_files if f not in HUB_KEEP + ("README.md",)] and not force:
        raise OutputExistsError(
            f"{dest}: the repo holds files but no ckptflow checkpoint; pass --force to commit over them"
        )
    extra = {} if "README.md" in files else {"README.md": model_card(manifest, repo_id, version).encode()}
    delete = [f for f in existing_files if f not in files and f not in extra and f not in HUB_KEEP]
    msg = f"ckptflow: {manifest.get('direction', 'checkpoint')} {manifest.get('family', '')}".strip()
    src_info = manifest.get("source") or {}
    desc = f"From {src_info.get('uri') or src_info.get('path')}" + (
        f"@{src_info['revision']}" if src_info.get("revision") else ""
    )
    sha, url = hub.commit_folder(
        repo_id,
        {rel: src / rel for rel in files},
        extra,
        private=not public,
        message=f"{msg} ({version[:19]})",
        description=desc,
        delete=delete,
    )
    return status, {"repo_id": repo_id, "commit": sha, "url": url}


# ------------------------------------------------------------------------------------------------ entry


def publish(
    src: str | os.PathLike,
    dest: str,
    force: bool = False,
    *,
    public: bool = False,
    verify_report: str | os.PathLike | None = None,
    workers: int | None = None,
) -> dict:
    """Publish `src` at `dest`; returns the receipt (status: published, replaced or unchanged)."""
    src = Path(src).expanduser().absolute()
    scheme = scheme_of(dest)
    if scheme == "file":
        destination_path(dest)  # bad file:// URIs fail before any hashing
    manifest, files = checked_source(src, verify_report)
    digest = digest_of(files)
    version = manifest.get("output_digest") or digest
    receipt = {
        "source": src.as_uri(),
        "digest": digest,
        "output_digest": version,
        "files": len(files),
        "bytes": sum(f["size"] for f in files.values()),
    }
    if scheme == "file":
        receipt["destination"] = destination_path(dest).as_uri()
        status = _publish_local(src, dest, files, digest, version, force)
    elif scheme == "gs":
        from converters.remote import gcs

        bucket, prefix = gcs.parse_gs_uri(dest)
        receipt["destination"] = f"gs://{bucket}/{prefix}"
        record = {
            "ckptflow_version": __version__,
            "digest": digest,
            "output_digest": version,
            "source": manifest.get("source"),
            "verify": manifest.get("verify"),
        }
        status, _ = gcs.publish_folder(
            src,
            receipt["destination"],
            files,
            version=version,
            record=record,
            force=force,
            workers=workers or gcs.WORKERS,
        )
    else:
        from converters.remote import hub

        repo_id, _ = hub.parse_hf_uri(dest)
        receipt["destination"] = f"hf://{repo_id}"
        status, extra = _publish_hub(src, dest, manifest, files, version, force, public)
        receipt.update({k: v for k, v in extra.items() if k != "repo_id"})
    return {**receipt, "status": status}

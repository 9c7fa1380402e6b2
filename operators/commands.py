"""What each pipeline step runs: the `ckptflow` arguments, identical in every execution mode.

Nothing here imports Airflow, Kubernetes or the converter libraries: the DAG file, the operators, the pod
builder and the tests all derive a step's command from `step_args(step, spec, layout)`, and only the program
in front of it differs (`local_entrypoint()` on a worker, `POD_ENTRYPOINT` in the converter image).

Steps hand results on through files in the run's work folder, never through XCom (the one XCom is the list of
part indices the mapped download and convert tasks expand over):

    <work root>/<dag_id>/<run key>/
        source/       download output (+ ckptflow-download.json: source, revision sha, file digests)
        .source.ckptflow-partial-<sha12>/   hub download split into parts: their files until `--finalize` publishes them
        converted/    convert output (+ ckptflow-manifest.json written by `ckptflow convert`)
        .converted.ckptflow-parts/   convert split into parts: their shares until `--finalize` assembles them
        verify/       verify report (verify.json, verify.md, kl_per_token.png)
        publish.json  publish receipt (destination, digest, status)

The run key comes from the DAG run id, so a retry or a re-run of a step in the same DAG run finds the same
folder and every step's command is the same each time it runs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import PurePosixPath

from converters.core.direction import Direction
from converters.core.direction import layout as layout_name
from converters.remote.download import looks_local
from converters.remote.publish import SUPPORTED_SCHEMES

STEPS = ("download", "convert", "verify", "publish")
# Not subcommands: `ckptflow convert --finalize`, which assembles the parts of a convert split into `parts` pieces,
# and `ckptflow download --finalize`, which checks the parts of a split download and publishes the staged source.
FINALIZE = "finalize"
DOWNLOAD_FINALIZE = "download_finalize"
MAX_PARTS = 256  # one mapped task instance (one process or pod) per part: far more than any model needs
DIRECTIONS = tuple(d.param for d in Direction)  # the DAG param's values: hf-to-maxtext, maxtext-to-hf
DTYPES = ("bfloat16", "float32")
EXECUTION_MODES = ("local", "kubernetes")
AUTO_MODEL = "auto"
DEFAULT_MAX_KL = 0.015
DEFAULT_NODE_POOL = "cpu-standard"

# What the DAG's params accept (its Param schemas use these patterns, and `RunSpec` checks them again, so a run
# started any other way is held to the same rules): ASCII letters, digits and `._+@=,:/-` only, so no whitespace,
# quotes or shell metacharacters; no `..` anywhere (no traversal); only the URI schemes ckptflow can write.
# JSON Schema patterns are ECMA regexes matched with `re.search`, where `$` also matches before a final newline:
# the lookahead refusing any whitespace closes that gap.
_GUARD = r"(?![\s\S]*(\.\.|\s))"
_PATH_CHARS = r"[A-Za-z0-9._+@=,:/-]"
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
SOURCE_PATTERN = rf"^{_GUARD}((file://)?/{_PATH_CHARS}*|{_NAME}/{_NAME})$"  # absolute path, file:// URI, or org/name
REVISION_PATTERN = rf"^{_GUARD}[A-Za-z0-9_][A-Za-z0-9_./-]{{0,254}}$"
# file:///abs/path, gs://bucket/prefix (a valid bucket name, a non-empty prefix) or hf://org/name
# (converters.remote.publish parses each fully; SUPPORTED_SCHEMES lists the three).
DESTINATION_PATTERN = (
    rf"^{_GUARD}(file:///{_PATH_CHARS}+"
    rf"|gs://[a-z0-9][a-z0-9._-]{{1,220}}[a-z0-9]/{_PATH_CHARS}*[A-Za-z0-9._+@=,:-]"
    rf"|hf://{_NAME}/{_NAME})$"
)

# `RunSpec`'s own check, for runs created around the form and for other callers: looser than the patterns (spaces
# and plain-path destinations pass) but never a `..` segment, a control character, a quote, a shell metacharacter
# or a scheme ckptflow does not handle.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f$`;|&<>(){}\[\]*?!'\"\\]|(^|/)\.\.(/|$)")


def _check_locations(source: object, destination: object, revision: object) -> None:
    for name, value in (("source", source), ("destination", destination), ("revision", revision)):
        if value is None and name == "revision":
            continue
        if not isinstance(value, str) or _UNSAFE.search(value):
            raise ValueError(
                f"{name} {value!r} is refused: no '..' segments, control characters, quotes or shell metacharacters"
            )
    if not (source.startswith(("/", "file:///")) and "://" not in source.removeprefix("file://")) and not re.fullmatch(
        rf"{_NAME}/{_NAME}", source
    ):
        raise ValueError(
            f"source {source!r} is not an absolute path, a file:///absolute/path URI or a Hugging Face repo id org/name"
        )
    scheme, sep, _ = destination.partition("://")
    if sep and (scheme not in SUPPORTED_SCHEMES or (scheme == "file" and not destination.startswith("file:///"))):
        raise ValueError(
            f"destination {destination!r}: use {', '.join(s + '://' for s in SUPPORTED_SCHEMES)} (file:///absolute/path)"
        )
    if not sep and not destination.startswith("/"):
        raise ValueError(f"destination {destination!r} is not an absolute path or a URI")
    if revision is not None and not re.fullmatch(REVISION_PATTERN, revision):
        raise ValueError(
            f"revision {revision!r} is not a branch, tag or commit (letters, digits and ._/- only, no '..')"
        )


# The program in front of `step_args` inside the converter image (its console script).
POD_ENTRYPOINT = ["ckptflow"]

# `ckptflow` exit status 2 is bad input (CkptflowError): retrying the same command cannot help.
EXIT_BAD_INPUT = 2

# Environment every step gets in both modes: output reaches the log line by line, progress bars rarely.
STEP_ENV = {"PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "30"}
# Steps that talk to the hub (or object storage) and so get the credentials; the others get none. The parts of a
# split download and its finalize (which fetches the small files) all fetch from the hub.
CREDENTIAL_STEPS = ("download", DOWNLOAD_FINALIZE, "publish")

DOWNLOAD_MANIFEST = "ckptflow-download.json"  # converters.outputs.manifest.DOWNLOAD_MANIFEST
CONVERT_MANIFEST = "ckptflow-manifest.json"  # converters.outputs.manifest.MANIFEST
PARTS_STAGING = ".{name}.ckptflow-parts"  # `ckptflow convert --part`: hidden sibling of OUT, same file system
VERIFY_REPORT = "verify.json"  # converters.verify.report.write_json


def local_entrypoint() -> list[str]:
    """The program that runs `ckptflow` on this worker: `$CKPTFLOW_CLI` when set, else this interpreter.

    This is the one place the local-mode operators take their command from, so a test (or a deployment
    with ckptflow in another venv) substitutes it here.
    """
    override = os.environ.get("CKPTFLOW_CLI", "").strip()
    if override:
        return shlex.split(override)
    return [sys.executable, "-m", "converters"]


@dataclass(frozen=True)
class RunSpec:
    """The parameters of one conversion (the `convert_checkpoint` DAG params, checked again here)."""

    source: str
    destination: str
    model: str = AUTO_MODEL
    revision: str | None = "main"
    direction: Direction = Direction.TO_MAXTEXT  # the DAG param's value (`hf-to-maxtext`, ...) is accepted too
    scan: bool = True
    dtype: str = "bfloat16"
    max_kl: float = DEFAULT_MAX_KL
    execution_mode: str = "local"
    node_pool: str = DEFAULT_NODE_POOL
    parts: int = 1  # download and convert split into this many processes (or pods) writing to shared storage

    def __post_init__(self):
        if not isinstance(self.direction, Direction):
            object.__setattr__(self, "direction", Direction.from_param(self.direction))
        for name, allowed in (("dtype", DTYPES), ("execution_mode", EXECUTION_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not self.source or not self.destination:
            raise ValueError("source and destination are required")
        _check_locations(self.source, self.destination, self.revision)
        if not (isinstance(self.max_kl, (int, float)) and not isinstance(self.max_kl, bool) and self.max_kl > 0):
            raise ValueError(f"max_kl must be a positive number, got {self.max_kl!r}")
        if not isinstance(self.scan, bool):
            raise ValueError(f"scan must be true or false, got {self.scan!r}")
        if not (isinstance(self.parts, int) and not isinstance(self.parts, bool) and 1 <= self.parts <= MAX_PARTS):
            raise ValueError(f"parts must be a whole number from 1 to {MAX_PARTS}, got {self.parts!r}")

    @classmethod
    def from_params(cls, params: Mapping, **overrides) -> RunSpec:
        """From DAG run params (unknown keys ignored); `overrides` with a None value are skipped."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in dict(params).items() if k in names}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("revision") == "":
            values["revision"] = None
        if "max_kl" in values and isinstance(values["max_kl"], str):
            values["max_kl"] = float(values["max_kl"])
        # JSON Schema's "integer" also admits 3.0 (a JSON number with a zero fraction)
        if isinstance(values.get("parts"), float) and values["parts"].is_integer():
            values["parts"] = int(values["parts"])
        return cls(**values)

    @property
    def source_is_local(self) -> bool:
        return looks_local(self.source)

    @property
    def target_format(self) -> str:
        return self.direction.target

    @property
    def source_format(self) -> str:
        return self.direction.source

    @property
    def layout(self) -> str:
        return layout_name(self.scan)

    @property
    def model_name(self) -> str | None:
        return None if self.model == AUTO_MODEL else self.model


def run_key(dag_id: str, run_id: str) -> str:
    """A folder name for a DAG run: readable, filesystem-safe, and distinct for distinct run ids."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._")[:80] or "run"
    return f"{dag_id}/{safe}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class WorkLayout:
    """Where one DAG run's steps read and write, under `root` (a local path or a pod mount path)."""

    root: str

    @classmethod
    def for_run(cls, base: str, dag_id: str, run_id: str) -> WorkLayout:
        return cls(str(PurePosixPath(base) / run_key(dag_id, run_id)))

    def _p(self, *parts: str) -> str:
        return str(PurePosixPath(self.root, *parts))

    @property
    def source_dir(self) -> str:
        return self._p("source")

    @property
    def converted_dir(self) -> str:
        return self._p("converted")

    @property
    def parts_staging_dir(self) -> str:
        """Where the parts of a split convert put their shares until finalize (named by the converter)."""
        return self._p(PARTS_STAGING.format(name=PurePosixPath(self.converted_dir).name))

    @property
    def verify_dir(self) -> str:
        return self._p("verify")

    @property
    def publish_receipt(self) -> str:
        return self._p("publish.json")

    def hf_dir(self, spec: RunSpec) -> str:
        return self.source_dir if spec.direction is Direction.TO_MAXTEXT else self.converted_dir

    def maxtext_dir(self, spec: RunSpec) -> str:
        return self.converted_dir if spec.direction is Direction.TO_MAXTEXT else self.source_dir

    def result_files(self) -> dict[str, str]:
        """The small JSON file each step leaves for the next ones (and for lineage)."""
        return {
            "download": self._p("source", DOWNLOAD_MANIFEST),
            "convert": self._p("converted", CONVERT_MANIFEST),
            "verify": self._p("verify", VERIFY_REPORT),
            "publish": self.publish_receipt,
        }


def _in_parts(what: str, args: list[str], spec: RunSpec, part: int | None, finalize: bool) -> list[str]:
    """`args` of one part of `what` (`--part I/N`) or of its finalize (`--finalize`) when the run is split into
    `spec.parts` > 1; with one part, the whole single-process command as it always was."""
    if finalize:
        if spec.parts == 1:
            raise ValueError(f"a {what} in one part has nothing to finalize")
        return args + ["--finalize"]
    if spec.parts == 1:  # part 0 of 1 is the whole step: the single-process command
        if part not in (None, 0):
            raise ValueError(f"part {part} of a {what} in one part")
        return args
    if not (isinstance(part, int) and not isinstance(part, bool) and 0 <= part < spec.parts):
        raise ValueError(f"{what} in {spec.parts} parts needs a part index from 0 to {spec.parts - 1}, got {part!r}")
    return args + ["--part", f"{part}/{spec.parts}"]


def step_args(step: str, spec: RunSpec, layout: WorkLayout, part: int | None = None) -> list[str]:
    """The `ckptflow` arguments of `step` (what follows the program name).

    With `spec.parts > 1`, download and convert run once per `part` (0 <= part < parts: `--part I/N`) and their
    finalize steps (`download_finalize`, `finalize`) complete them (`--finalize`); with one part, download and
    convert are the single-process commands as they always were.
    """
    if step in ("download", DOWNLOAD_FINALIZE):
        # Every part and the finalize get the same SOURCE, OUT and revision: the converter stages the parts' files
        # beside OUT in a folder named by the resolved commit (a local source has nothing to split: its parts
        # do nothing and the finalize copies it).
        args = ["download", spec.source, layout.source_dir]
        if spec.direction is Direction.TO_HF:  # the source is a MaxText checkpoint
            args += ["--format", spec.source_format]
        if not spec.source_is_local and spec.revision:
            args += ["--revision", spec.revision]
        return _in_parts("download", args, spec, part, finalize=step == DOWNLOAD_FINALIZE)
    if step in ("convert", FINALIZE):
        # Every part and the finalize get the same SRC, OUT and options: the converter derives its staging folder
        # from OUT and checks at finalize that all parts belong to this same conversion.
        args = ["convert", layout.source_dir, layout.converted_dir, "--to", spec.target_format]
        args += ["--scan" if spec.scan else "--no-scan", "--dtype", spec.dtype]
        if spec.model_name:
            args += ["--model", spec.model_name]
        # --overwrite: a retry replaces whatever an earlier try left (convert writes atomically anyway).
        args += ["--overwrite", "--quiet"]
        return _in_parts("conversion", args, spec, part, finalize=step == FINALIZE)
    if step == "verify":
        return [
            "verify",
            "--hf",
            layout.hf_dir(spec),
            "--maxtext",
            layout.maxtext_dir(spec),
            "--max-kl",
            repr(float(spec.max_kl)),
            "--report",
            layout.verify_dir,
        ]
    if step == "publish":
        # The verify metrics go into the checkpoint's manifest (and the hub model card) as it is published.
        return [
            "publish",
            layout.converted_dir,
            spec.destination,
            "--receipt",
            layout.publish_receipt,
            "--verify-report",
            layout.result_files()["verify"],
        ]
    raise ValueError(f"unknown step {step!r}; steps are {', '.join((*STEPS, DOWNLOAD_FINALIZE, FINALIZE))}")

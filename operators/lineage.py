"""Lineage of a conversion: asset URIs, asset-event extras and OpenLineage datasets/facets.

Each step reads and writes named things:

    download  source (hf://org/repo@<sha> or file://...)     -> staged source (work folder)
              (split into parts: each part reads the source, download_finalize writes the staged source)
    convert   staged source                                  -> converted checkpoint (work folder)
              (split into parts: each part reads the staged source, finalize writes the converted checkpoint)
    verify    staged source + converted checkpoint           -> verify report (work folder)
    publish   converted checkpoint + verify report           -> destination (file://, later gs:// / hf://)

Airflow side: URIs become `Asset`s; concrete events are attached at run time through each step's
`AssetAlias` (the URIs depend on the run's parameters), with extras gathered from the steps' result files
(source revision sha, model, direction, layout, dtype, verify metrics, output digest).
OpenLineage side: the same URIs become datasets (file -> namespace `file`, gs -> `gs://bucket`,
hf -> `https://huggingface.co` with the revision as the dataset version) and the extras a `ckptflow` run facet.
Nothing here imports the OpenLineage client at module import time.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from converters.io.files import digest_of
from converters.remote.download import local_path
from operators.commands import DOWNLOAD_FINALIZE, FINALIZE, RunSpec

HF_NAMESPACE = "https://huggingface.co"
# A finalize produces what its step produces with one part (the staged source, the converted checkpoint): same alias.
_FINALIZED = {DOWNLOAD_FINALIZE: "download", FINALIZE: "convert"}


def alias_name(step: str) -> str:
    return f"ckptflow-{_FINALIZED.get(step, step)}"


def file_uri(path: str) -> str:
    return "file://" + urllib.parse.quote(path)


def source_uri(spec: RunSpec, revision_sha: str | None = None) -> str:
    if spec.source_is_local:
        return file_uri(str(local_path(spec.source)))
    return f"hf://{spec.source}@{revision_sha or spec.revision or 'main'}"


def destination_uri(spec: RunSpec) -> str:
    return spec.destination if "://" in spec.destination else file_uri(spec.destination)


def step_uris(step: str, uris: dict[str, str], parts: int = 1) -> tuple[list[str], list[str]]:
    """(inlets, outlets) of a step, from the run's URIs: source, staged, converted, report, destination.

    The staged source and the converted checkpoint are the outputs of the steps that make them whole: download and
    convert, or their finalize steps when they run in `parts` > 1 (a part's share in a staging folder is no asset
    of its own)."""
    table = {
        "download": (["source"], ["staged"] if parts == 1 else []),
        DOWNLOAD_FINALIZE: (["source"], ["staged"]) if parts > 1 else ([], []),
        "convert": (["staged"], ["converted"] if parts == 1 else []),
        FINALIZE: (["staged"], ["converted"]) if parts > 1 else ([], []),
        "verify": (["staged", "converted"], ["report"]),
        "publish": (["converted", "report"], ["destination"]),
    }
    ins, outs = table[step]
    return [uris[k] for k in ins], [uris[k] for k in outs]


# --------------------------------------------------------------------------------------------- extras


def recorded_output_digest(manifest: dict | None) -> str | None:
    """One digest of a converted folder, read from its `ckptflow-manifest.json`: its `output_digest` (every
    manifest ckptflow writes has one), else, for older manifests, one over every output file's sha256."""
    if not manifest:
        return None
    if isinstance(manifest.get("output_digest"), str):
        return manifest["output_digest"]
    outs = manifest.get("outputs") or {}
    if not outs or not all(isinstance(o, dict) and "sha256" in o for o in outs.values()):
        return None
    return digest_of({rel: {"size": o.get("bytes"), "sha256": o["sha256"]} for rel, o in outs.items()})


def verify_metrics(report: dict | None) -> dict[str, Any] | None:
    """A verify report's verdict and metrics (`converters.remote.publish.verify_summary`), None without a report."""
    from converters.remote.publish import verify_summary

    return verify_summary(report) if report else None


def extras(step: str, spec: RunSpec, results: dict[str, dict | None]) -> dict[str, Any]:
    """Asset-event extras for `step`, from the parameters and the result files available so far."""
    download, manifest, report, receipt = (results.get(k) for k in ("download", "convert", "verify", "publish"))
    # A part knows nothing of the assembled result (a download manifest or a checkpoint manifest there is an
    # earlier try's).
    if step == "download" and spec.parts > 1:
        download = None
    if step == "convert" and spec.parts > 1:
        manifest = None
    layout = spec.layout
    if manifest and isinstance((manifest.get("options") or {}).get("scan_layers"), bool):
        layout = "scanned" if manifest["options"]["scan_layers"] else "unscanned"
    out: dict[str, Any] = {
        "step": step,
        "model": spec.model,
        "direction": spec.direction.param,
        "layout": layout,
        "dtype": spec.dtype,
        "source": spec.source,
        "source_revision": None if spec.source_is_local else spec.revision,
        "source_revision_sha": (download or {}).get("revision"),
        "source_digest": (download or {}).get("digest"),
        "parts": spec.parts if spec.parts > 1 else None,
    }
    if manifest:
        out["family"] = manifest.get("family")
        out["ckptflow_version"] = manifest.get("ckptflow_version")
    if step in ("convert", FINALIZE, "verify", "publish"):
        out["output_digest"] = recorded_output_digest(manifest)
    if step in ("verify", "publish"):
        out["verify"] = verify_metrics(report)
    if step == "publish" and receipt:
        out["destination"] = receipt.get("destination")
        out["published_digest"] = receipt.get("digest")
        out["publish_status"] = receipt.get("status")
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------------------------------- OpenLineage


def ol_name(uri: str) -> tuple[str, str, str | None]:
    """(namespace, name, version) of a URI under OpenLineage naming."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme == "hf":
        repo, _, rev = (parsed.netloc + parsed.path).partition("@")
        return HF_NAMESPACE, repo, rev or None
    if parsed.scheme == "file":
        return "file", urllib.parse.unquote(parsed.path), None
    if parsed.scheme in ("gs", "s3"):
        return f"{parsed.scheme}://{parsed.netloc}", parsed.path.lstrip("/"), None
    return f"{parsed.scheme}://{parsed.netloc}", parsed.path.lstrip("/") or "/", None


def ol_dataset(
    uri: str, version: str | None = None, *, output: bool = False, assertions: list[tuple[str, bool]] | None = None
):
    from openlineage.client.event_v2 import Dataset, InputDataset, OutputDataset
    from openlineage.client.facet_v2 import data_quality_assertions_dataset as dq
    from openlineage.client.facet_v2 import dataset_version_dataset

    namespace, name, uri_version = ol_name(uri)
    facets: dict[str, Any] = {}
    if version or uri_version:
        facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=version or uri_version)
    input_facets = {}
    if assertions:
        input_facets["dataQualityAssertions"] = dq.DataQualityAssertionsDatasetFacet(
            assertions=[dq.Assertion(assertion=a, success=ok) for a, ok in assertions]
        )
    if output:
        return OutputDataset(namespace=namespace, name=name, facets=facets)
    if input_facets:
        return InputDataset(namespace=namespace, name=name, facets=facets, inputFacets=input_facets)
    return Dataset(namespace=namespace, name=name, facets=facets)


def ckptflow_run_facet(data: dict[str, Any]):
    """A custom OpenLineage run facet `ckptflow` carrying the step's extras."""
    import attr
    from openlineage.client.facet_v2 import RunFacet

    @attr.define
    class CkptflowRunFacet(RunFacet):
        step: str = attr.field()
        extras: dict = attr.field(factory=dict)

        @staticmethod
        def _get_schema() -> str:
            return "https://github.com/ckptflow/ckptflow/blob/main/operators/lineage.py#CkptflowRunFacet"

    return CkptflowRunFacet(step=data.get("step", ""), extras=data)


def operator_lineage(step: str, inlets: list[str], outlets: list[str], data: dict[str, Any] | None):
    """The `OperatorLineage` a step reports: its datasets, their versions and (when known) the extras."""
    from airflow.providers.openlineage.extractors import OperatorLineage

    data = data or {}
    metrics = data.get("verify") or {}
    assertions = None
    if step == "verify" and "passed" in metrics:
        assertions = [(f"max per-token KL <= {metrics.get('max_kl_threshold')}", bool(metrics["passed"]))]
    inputs = []
    for uri in inlets:
        is_checkpoint = step == "verify" and uri == inlets[-1]
        inputs.append(ol_dataset(uri, assertions=assertions if is_checkpoint else None))
    out_version = {
        "download": "source_digest",
        DOWNLOAD_FINALIZE: "source_digest",
        "convert": "output_digest",
        FINALIZE: "output_digest",
        "publish": "published_digest",
    }.get(step)
    outputs = [ol_dataset(uri, data.get(out_version) if out_version else None, output=True) for uri in outlets]
    run_facets = {"ckptflow": ckptflow_run_facet(data)} if data else {}
    return OperatorLineage(inputs=inputs, outputs=outputs, run_facets=run_facets)

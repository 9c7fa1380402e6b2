"""`convert_checkpoint`: download (in `parts` mapped pieces) -> download_finalize -> convert (in `parts` mapped
pieces) -> finalize -> verify -> publish one LLM checkpoint (HF <-> MaxText).

Triggered by hand with a form (typed params below). Parsing this file imports Airflow's task SDK, the
light `converters.core.registry` and the `operators` package only: no jax, torch, transformers or Kubernetes.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import operators  # noqa: F401  (installed with ckptflow)
except ImportError:  # a checkout used as is: the repo root is the DAG folder's parent
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow.sdk import DAG, Param

from converters.core.direction import Direction
from converters.core.registry import model_names
from operators.ckptflow_operators import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUTS,
    ConvertOperator,
    DownloadFinalizeOperator,
    DownloadOperator,
    FinalizeOperator,
    PublishOperator,
    VerifyOperator,
    part_indices,
)
from operators.commands import (
    AUTO_MODEL,
    DEFAULT_MAX_KL,
    DEFAULT_NODE_POOL,
    DESTINATION_PATTERN,
    DIRECTIONS,
    DTYPES,
    EXECUTION_MODES,
    MAX_PARTS,
    REVISION_PATTERN,
    SOURCE_PATTERN,
)
from operators.kubernetes import NODE_POOLS

DAG_ID = "convert_checkpoint"
TO_MAXTEXT, TO_HF = (
    Direction.TO_MAXTEXT.param,
    Direction.TO_HF.param,
)  # the direction param's values, for the texts below

# SOURCE_PATTERN (an absolute path or file:// URI of a local folder, or a Hugging Face repo id `org/name`),
# REVISION_PATTERN and DESTINATION_PATTERN come from operators.commands, which checks them again at run time.

PARAMS = {
    "model": Param(
        AUTO_MODEL,
        type="string",
        enum=[AUTO_MODEL, *model_names()],
        title="Model",
        description=(
            "MaxText model name from ckptflow's registry (`ckptflow models`). `auto` detects the family from the "
            "source's config.json (needed for sizes the registry does not list); kubernetes mode needs a name "
            "because it sizes each pod's memory from the model."
        ),
    ),
    "source": Param(
        type="string",
        pattern=SOURCE_PATTERN,
        examples=["meta-llama/Llama-3.1-8B", "/data/models/Qwen3-0.6B", "file:///data/maxtext/run7/checkpoints"],
        title="Source",
        description=(
            "Hugging Face repo id (`org/name`) or an absolute path / `file://` URI of a local folder. For "
            f"{TO_MAXTEXT}: a safetensors model folder (pickled *.bin/*.pth weights are refused). For "
            f"{TO_HF}: a MaxText (Orbax) checkpoint folder."
        ),
    ),
    "revision": Param(
        "main",
        type="string",
        pattern=REVISION_PATTERN,
        examples=["main", "v1.0", "0123456789abcdef0123456789abcdef01234567"],
        title="Revision",
        description="Hub branch, tag or commit of the source repo; resolved to a commit sha when downloaded. Ignored "
        "for local folders.",
    ),
    "direction": Param(
        TO_MAXTEXT,
        type="string",
        enum=list(DIRECTIONS),
        values_display={d.param: d.title for d in Direction},
        title="Direction",
        description=f"{TO_MAXTEXT} writes a MaxText checkpoint (load it with load_parameters_path=<dest>/0/items); "
        f"{TO_HF} writes a transformers model folder.",
    ),
    "scan": Param(
        True,
        type="boolean",
        title="Scanned layers",
        description=f"{TO_MAXTEXT}: write stacked layers (MaxText scan_layers=true) or one subtree per layer. {TO_HF} "
        f"detects the layout itself.",
    ),
    "dtype": Param(
        "bfloat16",
        type="string",
        enum=list(DTYPES),
        title="Weights dtype",
        description="dtype of the written weights.",
    ),
    "destination": Param(
        type="string",
        pattern=DESTINATION_PATTERN,
        examples=[
            "file:///models/llama3.1-8b/maxtext-scanned-bf16",
            "gs://my-bucket/maxtext/llama3.1-8b/v1",
            "hf://my-org/Llama-3.1-8B-maxtext",
        ],
        title="Destination",
        description=(
            "Where the verified checkpoint is published, one location per version: `file:///abs/path`, "
            "`gs://bucket/prefix` (staged, marker object written last) or `hf://org/name` (private repo, one commit "
            "with a model card). An existing destination with different content is never overwritten."
        ),
    ),
    "max_kl": Param(
        DEFAULT_MAX_KL,
        type="number",
        exclusiveMinimum=0,
        maximum=10,
        title="Max KL",
        description="Verification threshold: publish only if every token's KL(P_hf || Q_maxtext) is at most this "
        "(MaxText's checker uses 0.015).",
    ),
    "execution_mode": Param(
        "local",
        type="string",
        enum=list(EXECUTION_MODES),
        values_display={"local": "Local (worker subprocess)", "kubernetes": "Kubernetes pods"},
        title="Execution mode",
        description="local: each step runs `ckptflow` as a subprocess of the Airflow worker. kubernetes: each step "
        "runs the same command in a pod of the converter image.",
    ),
    "node_pool": Param(
        DEFAULT_NODE_POOL,
        type="string",
        enum=list(NODE_POOLS),
        values_display={name: f"{name}: {pool.description}" for name, pool in NODE_POOLS.items()},
        title="Node pool",
        description=(
            "kubernetes mode: node-pool preset. On a TPU preset only steps that compute on an accelerator use the "
            "slice; none does today (verify streams the models through the CPU), so every step runs on cpu-standard."
        ),
    ),
    "parts": Param(
        1,
        type="integer",
        minimum=1,
        maximum=MAX_PARTS,
        title="Download and convert in parts",
        description=(
            "Split the download and convert steps each into this many processes (kubernetes: pods) that run at the "
            "same time, each followed by a finalize task that completes their output (a hub download's parts fetch "
            "disjoint sets of weight files; a local source has nothing to split). Worth it for very large models "
            "(hundreds of GB), where one process takes hours; 1 (the default) runs each step in one process. All "
            "parts write into the run's work folder, which must be shared storage that every part can reach "
            "(kubernetes: a ReadWriteMany PVC or a GCS FUSE bucket; local mode: one worker, or a work root shared by "
            "all workers). A failed part is retried alone; the other parts' work is kept."
        ),
    ),
}


def _param_table() -> str:
    rows = ["| param | default | allowed | meaning |", "|---|---|---|---|"]
    for name, p in PARAMS.items():
        schema = p.schema
        default = (
            "*(required)*" if p.value is None or not isinstance(p.value, (str, int, float, bool)) else f"`{p.value}`"
        )
        if "enum" in schema:
            allowed = ", ".join(f"`{v}`" for v in schema["enum"])
        elif schema.get("type") == "number":
            allowed = f"> {schema.get('exclusiveMinimum', '-inf')}, <= {schema.get('maximum', 'inf')}"
        elif schema.get("type") == "integer":
            allowed = f"whole number {schema.get('minimum', '-inf')} to {schema.get('maximum', 'inf')}"
        elif "pattern" in schema:
            allowed = f"`{schema['pattern'].replace('|', '&#124;')}`"
        else:
            allowed = schema.get("type", "")
        rows.append(f"| `{name}` ({schema.get('title', name)}) | {default} | {allowed} | {p.description or ''} |")
    return "\n".join(rows)


DOC = f"""
# convert_checkpoint

Convert one LLM checkpoint between Hugging Face safetensors and MaxText (Orbax), prove it by comparing
logits, and publish it only if it passed.

**Steps** (each runs `ckptflow <step>`; the command is the same in both execution modes):

0. `plan_parts`: lists the part indices `0 .. parts-1` that `download` and `convert` are mapped over.
1. `download`: stage the source in the run's work folder (safetensors + config + tokenizer; hub revision
   resolved to a commit sha; atomic). A mapped task: with `parts` N > 1 it runs as N task instances at once,
   instance I running `ckptflow download ... --part I/N` (part I's share of the weight files; nothing for a
   local source).
2. `download_finalize`: with N > 1, `ckptflow download ... --finalize` checks every part's files, fetches the
   small rest and moves the staged source into place with `ckptflow-download.json`; with N = 1 it does nothing.
3. `convert`: `ckptflow convert --to maxtext|hf` into the work folder (atomic; a retry replaces it). A mapped
   task: with N > 1 it runs as N task instances at once (N processes, or N pods), instance I running
   `ckptflow convert ... --part I/N`. A failed part (of download or convert) is retried alone; the
   others' output is kept.
4. `finalize`: with N > 1, `ckptflow convert ... --finalize` checks that every part finished for this
   conversion and moves the assembled checkpoint into place with its manifest; with N = 1 it does nothing.
5. `verify`: `ckptflow verify` (HF vs MaxText logits, KL per token). A KL above `max_kl` fails the run
   at once (no retries) and **publish does not run**.
6. `publish`: check the converted folder against its manifest, record the verify metrics in it and publish
   it to `destination` (file://, gs:// or hf://; a reader never sees half of it; the same content again is a
   no-op; different content at an existing destination is refused).

Every step retries {DEFAULT_RETRIES} times with exponential backoff (waits of about 1-2, 2-4 and 4-8 minutes,
never more than 15) and has its own execution timeout
({", ".join(f"{step} {t.total_seconds() / 3600:g} h" for step, t in DEFAULT_TIMEOUTS.items())}).
Steps hand results on through small JSON files in the work folder (`ckptflow-download.json`,
`ckptflow-manifest.json`, `verify/verify.json`, `publish.json`), never through XCom (the one XCom is the list
of part indices `download` and `convert` are mapped over). Parts stage their output beside `source/` and
`converted/` in the work folder, so with `parts` > 1 every part must reach the same storage (the shared work
volume in kubernetes mode).

**Lineage:** asset events (through the aliases `ckptflow-download`, `ckptflow-convert`,
`ckptflow-verify`, `ckptflow-publish`; the staged source's event comes from `download`, or from
`download_finalize` in parts, and the converted checkpoint's from `convert`, or from `finalize` in parts) for
`hf://org/repo@<sha>` / `file://...` URIs, with extras
(source revision sha, model, direction, layout, dtype, verify metrics, output digest); OpenLineage
START/COMPLETE events for every task with the same datasets.

**Where things go:** local mode works under `$CKPTFLOW_WORK_ROOT` (default `$AIRFLOW_HOME/ckptflow-work`)
`/convert_checkpoint/<run>/`; kubernetes mode under the shared work volume (`CKPTFLOW_K8S_*` settings,
see `operators/kubernetes.py`).

## Parameters

{_param_table()}
"""

with DAG(
    dag_id=DAG_ID,
    schedule=None,
    catchup=False,
    params=PARAMS,
    doc_md=DOC,
    description="Convert an LLM checkpoint HF <-> MaxText, verify it by logits, publish it",
    tags=["ckptflow"],
    max_active_runs=4,
) as dag:
    parts = part_indices()  # [0, ..., parts - 1]: mapping follows each run's `parts` param
    # One task instance per part; each fails, retries and succeeds on its own (map index = part index).
    part_label = "part {{ task.part }}/{{ params.parts }}"
    download = DownloadOperator.partial(task_id="download", map_index_template=part_label).expand(part=parts)
    download_finalize = DownloadFinalizeOperator(task_id="download_finalize")  # all_success: once every part is done
    convert = ConvertOperator.partial(task_id="convert", map_index_template=part_label).expand(part=parts)
    finalize = FinalizeOperator(task_id="finalize")  # all_success: only once every part is done
    verify = VerifyOperator(task_id="verify")
    publish = PublishOperator(task_id="publish")  # trigger rule all_success: only after a passed verify

    parts >> download >> download_finalize >> convert >> finalize >> verify >> publish

"""Airflow operators for the pipeline steps: download and convert (whole, or one part of N), their finalize steps,
verify, publish.

Every operator runs `ckptflow <step> ...` (arguments from `operators.commands.step_args`) in one of two modes,
chosen per DAG run (the `execution_mode` param) or per task (the `execution_mode` argument):

* `local`: a child process of the worker (`operators.local.LocalCommandRunner`); output streamed into the
  task log line by line; exit status 0 is success; killing the task kills the process group.
* `kubernetes`: the operator *is* a `KubernetesPodOperator`: its pod (`operators.kubernetes.pod_fields`) runs the
  same arguments in the converter image on the chosen node pool. The pod spec is worked out when the task's
  templates are rendered, so the UI's rendered template fields show it. Deferrable like any pod operator
  (`deferrable=True`, or Airflow's `[operators] default_deferrable`): the worker slot is freed while the pod runs
  and the triggerer watches it; a task whose worker died reattaches to its running pod instead of starting a second
  one. The HF token goes to the pod through a Secret of its own (`operators.pod_secret`), never in the pod spec.

Retries with exponential backoff and a per-step `execution_timeout` are defaults of every operator.
Failures that retrying cannot fix end the task at once (`AirflowFailException`): bad input (`ckptflow` exit
status 2) and a verification that measured a KL above the threshold. Steps are idempotent: paths depend only
on the DAG run, every `ckptflow` step writes atomically, and re-running a step redoes or confirms its output.

Scale-out: with the run's `parts` param N > 1, `DownloadOperator` and `ConvertOperator` are mapped over
`part_indices` (one task instance, so one process or pod, per part: `ckptflow download|convert --part I/N`);
`DownloadFinalizeOperator` publishes the staged source (`ckptflow download --finalize`) and `FinalizeOperator`
assembles the checkpoint (`ckptflow convert --finalize`). A failed part is retried alone: a part's command replaces
only its own share in the converter's staging folder, and nothing here deletes that folder. With N == 1, download
and convert run the whole step and the finalize steps have nothing to do.

Lineage: `outlets` are one `AssetAlias` per step (declared when the DAG is parsed); at run time the step
emits events for the concrete assets (`hf://org/repo@<sha>`, `file://...`, `gs://...`) with extras read
from the steps' result files, and reports the same datasets to OpenLineage.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import Asset, AssetAlias, BaseHook, task
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from operators import commands, lineage
from operators.commands import (
    CREDENTIAL_STEPS,
    DOWNLOAD_FINALIZE,
    EXIT_BAD_INPUT,
    FINALIZE,
    STEP_ENV,
    STEPS,
    RunSpec,
    WorkLayout,
    step_args,
)

if TYPE_CHECKING:
    from airflow.sdk import Context

    from operators.kubernetes import KubernetesSettings

DEFAULT_TIMEOUTS = {
    "download": timedelta(hours=3),  # also each part of a split download
    # checks the parts' files, fetches the small rest and moves everything into place (a copy on some volumes)
    DOWNLOAD_FINALIZE: timedelta(hours=3),
    "convert": timedelta(hours=6),  # also each part of a split convert
    FINALIZE: timedelta(hours=3),
    "verify": timedelta(hours=3),
    "publish": timedelta(hours=3),
}
DEFAULT_RETRIES = 3
DEFAULT_RETRY_DELAY = timedelta(seconds=30)
DEFAULT_BACKOFF = 2.0  # waits of 1-2, 2-4, 4-8 min (Airflow adds jitter), never more than DEFAULT_MAX_RETRY_DELAY
DEFAULT_MAX_RETRY_DELAY = timedelta(minutes=15)
HF_CONN_ID = "ckptflow_hf"  # Airflow connection whose password (or extra `token`) is the HF token
GCP_CONN_ID = "ckptflow_gcp"  # optional Airflow connection: extras key_path / project for gs:// publishing
_NOT_FOR_CHILD = ("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_", "_AIRFLOW")


def default_work_root() -> str:
    """Local-mode work folder: `$CKPTFLOW_WORK_ROOT`, else `$AIRFLOW_HOME/ckptflow-work`."""
    root = os.environ.get("CKPTFLOW_WORK_ROOT")
    if root:
        return str(Path(root).expanduser().absolute())
    home = os.environ.get("AIRFLOW_HOME") or str(Path("~/airflow").expanduser())
    return str(Path(home, "ckptflow-work").absolute())


def read_result(location: str | None) -> dict | None:
    """A step's small JSON result: a local path, or a URI Airflow's object storage can read (gs://...)."""
    if not location:
        return None
    try:
        if "://" not in location:
            return json.loads(Path(location).read_text())
        if location.startswith("pvc://"):
            return None  # a PVC is mounted in the pods only
        from airflow.sdk import ObjectStoragePath

        return json.loads(ObjectStoragePath(location).read_text())
    except (OSError, ValueError, ImportError, AttributeError):
        return None


@dataclass(frozen=True)
class StepPlan:
    """Everything one try of a step needs, worked out from the run's params before it executes."""

    spec: RunSpec
    layout: WorkLayout
    args: list[str]
    inlets: list[str]
    outlets: list[str]
    results: dict[str, str]  # step -> where its result file is readable from this worker (path or URI)


class CkptflowStepOperator(KubernetesPodOperator):
    """Base of the step operators; `step` names the `ckptflow` subcommand (or `download_finalize`, `finalize`).

    A `KubernetesPodOperator` whose pod is planned per run (kubernetes mode), or that runs the command as a local
    process (local mode, the pod machinery unused)."""

    step: ClassVar[str]
    part: int | None = None  # which part of a split step this task instance runs (PartStepOperator only)
    template_fields = (*KubernetesPodOperator.template_fields, "execution_mode", "node_pool")
    ui_color = "#e3f0fb"

    @classmethod
    def step_defaults(cls) -> dict[str, Any]:
        """Retries, backoff, timeout, outlets and doc every instance of the step gets unless told otherwise."""
        return {
            "retries": DEFAULT_RETRIES,
            "retry_delay": DEFAULT_RETRY_DELAY,
            "retry_exponential_backoff": DEFAULT_BACKOFF,
            "max_retry_delay": DEFAULT_MAX_RETRY_DELAY,
            "execution_timeout": DEFAULT_TIMEOUTS[cls.step],
            "outlets": [AssetAlias(lineage.alias_name(cls.step))],
            "doc_md": cls.__doc__,
        }

    @classmethod
    def partial(cls, **kwargs):
        # A mapped task is scheduled from its partial arguments (retries, timeout, outlets), not from __init__.
        return super().partial(**{**cls.step_defaults(), **kwargs})

    def __init__(
        self,
        *,
        execution_mode: str | None = None,
        node_pool: str | None = None,
        work_root: str | None = None,
        kubernetes_settings: KubernetesSettings | None = None,
        hf_conn_id: str = HF_CONN_ID,
        **kwargs,
    ):
        from operators.kubernetes import POD_OPERATOR_OPTIONS

        # the pod's own fields (image, command, resources, ...) are filled in per run when the step is planned
        kwargs = {**self.step_defaults(), **POD_OPERATOR_OPTIONS, "name": f"ckptflow-{self.step}", **kwargs}
        super().__init__(**kwargs)
        self.execution_mode = execution_mode  # None: the run's `execution_mode` param
        self.node_pool = node_pool  # None: the run's `node_pool` param
        self.work_root = work_root
        self.kubernetes_settings = kubernetes_settings
        self.hf_conn_id = hf_conn_id
        self._plan: StepPlan | None = None
        self._extras: dict[str, Any] | None = None
        self._runner = None
        self._hf_secret: str | None = None  # the token Secret this task instance's pod reads (pod_secret)

    # ------------------------------------------------------------------------------------------ planning

    def render_template_fields(self, context: Context, jinja_env=None) -> None:
        super().render_template_fields(context, jinja_env)
        # Planned here (before the OpenLineage START event) so lineage can name the concrete datasets, and the pod's
        # fields are set here so that the UI's rendered template fields show the pod this try runs.
        try:
            self._plan = self.plan(context)
        except (ValueError, KeyError):
            self._plan = None  # execute() plans again and fails the task with the message
            return
        if self._plan.spec.execution_mode == "kubernetes" and self._plan.args:
            try:
                self._set_pod_fields(self._plan, context)
            except AirflowFailException:
                pass  # execute() raises it again

    def plan(self, context: Context) -> StepPlan:
        spec = RunSpec.from_params(context["params"], execution_mode=self.execution_mode, node_pool=self.node_pool)
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        if spec.execution_mode == "kubernetes":
            settings = self._k8s_settings()
            layout = WorkLayout.for_run(settings.mount_path, dag_id, run_id)

            def uri(path: str) -> str:
                return settings.work_volume.uri(settings.mount_path, path)

            where = uri  # the worker can only reach the pods' files through their URIs
        else:
            layout = WorkLayout.for_run(self.work_root or default_work_root(), dag_id, run_id)
            uri, where = lineage.file_uri, str
        results = {step: where(p) for step, p in layout.result_files().items()}
        download = read_result(results["download"])  # the resolved revision sha, once downloaded
        uris = {
            "source": lineage.source_uri(spec, (download or {}).get("revision")),
            "staged": uri(layout.source_dir),
            "converted": uri(layout.converted_dir),
            "report": uri(layout.verify_dir),
            "destination": lineage.destination_uri(spec),
        }
        inlets, outlets = lineage.step_uris(self.step, uris, spec.parts)
        nothing_to_finalize = self.step in (DOWNLOAD_FINALIZE, FINALIZE) and spec.parts == 1
        args = [] if nothing_to_finalize else step_args(self.step, spec, layout, self.part)
        return StepPlan(spec, layout, args, inlets, outlets, results)

    def _k8s_settings(self) -> KubernetesSettings:
        from operators.kubernetes import KubernetesSettings

        return self.kubernetes_settings or KubernetesSettings.from_env()

    # ----------------------------------------------------------------------------------------- executing

    def execute(self, context: Context) -> None:
        plan = self._plan
        if plan is None:
            try:
                plan = self._plan = self.plan(context)
            except (ValueError, KeyError) as e:
                raise AirflowFailException(f"invalid parameters for {self.step}: {e}") from None
        if not plan.args:  # a finalize step of a run in one part
            self.log.info("%s: nothing to do in a run in one part (the step before it did all the work)", self.step)
            return
        self.inlets = [Asset(u) for u in plan.inlets]
        self.before_run(plan)
        if plan.spec.execution_mode == "kubernetes":
            self._set_pod_fields(plan, context)
            self._executing = True  # a pod found already finished is re-entered from inside execute (see below)
            try:
                self._pod_run(plan, lambda: super(CkptflowStepOperator, self).execute(context))
            finally:
                self._executing = False
        else:
            self._run_locally(plan)
        self._finish(plan, context)

    def trigger_reentry(self, context: Context, event: dict[str, Any]) -> Any:
        """Back from the triggerer (deferrable mode): the pod ended; map its exit status and finish the step."""
        if getattr(self, "_executing", False):  # execute found the pod already finished and did not defer
            return super().trigger_reentry(context, event)
        plan = self._plan or self.plan(context)
        self.inlets = [Asset(u) for u in plan.inlets]
        self._set_pod_fields(plan, context)  # a mapped part is not rendered again on resuming: its namespace etc.
        self._hf_secret = self._secret_name(context) if self._needs_token() else None
        self._pod_run(plan, lambda: super(CkptflowStepOperator, self).trigger_reentry(context, event))
        self._finish(plan, context)

    def _finish(self, plan: StepPlan, context: Context) -> None:
        """After the command exited 0: the step's checks, then lineage (asset events, OpenLineage extras)."""
        results = {step: read_result(loc) for step, loc in plan.results.items()}
        self.after_run(plan, results)
        if self.step in ("download", DOWNLOAD_FINALIZE):  # now the hub revision is resolved: name the source by its sha
            plan = self._plan = self.plan(context)
            self.inlets = [Asset(u) for u in plan.inlets]
        self._extras = lineage.extras(self.step, plan.spec, results)
        events = context["outlet_events"]
        for alias in self.outlets:
            if isinstance(alias, AssetAlias):
                for uri in plan.outlets:
                    events[alias].add(Asset(uri), extra=self._extras)
        self.log.info("%s done: %s", self.step, json.dumps(self._extras, sort_keys=True))

    def before_run(self, plan: StepPlan) -> None:
        """Hook for a step to prepare (local mode only sees the work folder)."""

    def after_run(self, plan: StepPlan, results: dict[str, dict | None]) -> None:
        """Hook for a step to check its results after `ckptflow` exited 0."""

    def on_command_failure(self, plan: StepPlan, exit_code: int, message: str) -> None:
        """Raise the right exception for a failed command; the default retries anything but bad input."""
        if exit_code == EXIT_BAD_INPUT:
            raise AirflowFailException(f"ckptflow {self.step} rejected its input (not retried): {message}")
        raise AirflowException(f"ckptflow {self.step} failed with exit status {exit_code}: {message}")

    def _run_locally(self, plan: StepPlan) -> None:
        from operators.local import LocalCommandRunner

        Path(plan.layout.root).mkdir(parents=True, exist_ok=True)
        self._runner = LocalCommandRunner(log=self.log)
        argv = [*commands.local_entrypoint(), *plan.args]  # looked up on the module: tests substitute it
        result = self._runner.run(argv, env=self._child_env(), cwd=plan.layout.root)
        if result.exit_code != 0:
            self.on_command_failure(plan, result.exit_code, result.last_error)

    def _child_env(self) -> dict[str, str]:
        """The worker's environment without Airflow's own settings, plus the step's credentials."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_FOR_CHILD)}
        env.update(STEP_ENV)
        if self.step not in CREDENTIAL_STEPS:  # a token in the worker's own environment stays out of the other steps
            for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
                env.pop(k, None)
        if self.step in CREDENTIAL_STEPS and (token := self._hf_token()):
            env["HF_TOKEN"] = token
        if self.step in CREDENTIAL_STEPS:
            env.update(self._gcp_env())
        return env

    def _gcp_env(self) -> dict[str, str]:
        """GCS credentials for gs:// (local mode) from the Airflow connection `ckptflow_gcp` (google_cloud_platform):
        extra `key_path` (a service-account key file on the worker) and `project`. Without the connection the
        client uses Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, Workload Identity)."""
        try:
            conn = BaseHook.get_connection(GCP_CONN_ID)
        except Exception:
            return {}
        extra = conn.extra_dejson or {}
        env = {}
        key_path = extra.get("key_path") or extra.get("extra__google_cloud_platform__key_path")
        project = extra.get("project") or extra.get("extra__google_cloud_platform__project")
        if key_path:
            env["GOOGLE_APPLICATION_CREDENTIALS"] = str(key_path)
        if project:
            env["GOOGLE_CLOUD_PROJECT"] = str(project)
        return env

    def _hf_token(self) -> str | None:
        try:
            conn = BaseHook.get_connection(self.hf_conn_id)
        except Exception:  # no such connection: public repos need no token
            return None
        token = conn.password or (conn.extra_dejson or {}).get("token")
        if token:
            from airflow.sdk.log import mask_secret

            mask_secret(token)
        return token or None

    def _set_pod_fields(self, plan: StepPlan, context: Context) -> None:
        """This try's pod: `operators.kubernetes.pod_fields` for the step, plan and model, set on this operator as
        `KubernetesPodOperator`'s own arguments would be."""
        fields = self.pod_fields(plan, context)
        # KubernetesPodOperator converts some arguments in __init__ (env vars, pull secrets, tolerations): let it
        converted = KubernetesPodOperator(task_id=f"{self.task_id}.pod", **fields)
        for name in fields:
            setattr(self, name, getattr(converted, name))
        self.pod_request_obj = None

    def pod_fields(self, plan: StepPlan, context: Context | None = None) -> dict:
        """The pod arguments of this step for `plan` (also used to render and check pod specs without a cluster)."""
        from operators.kubernetes import node_pool, pod_fields

        if plan.spec.model_name is None:
            raise AirflowFailException(
                "kubernetes mode sizes each pod's memory from the model: choose a model name instead of 'auto'"
            )
        settings = self._k8s_settings()
        secret, optional = settings.hf_token_secret, True  # a cluster-synced Secret, if configured
        if context is not None and self._needs_token():
            secret, optional = self._secret_name(context), False  # this task instance's own, made before the pod
        timeout = int(self.execution_timeout.total_seconds()) if self.execution_timeout else None
        try:
            return pod_fields(
                step=self.step,
                part=self.part if plan.spec.parts > 1 else None,
                args=plan.args,
                pool=node_pool(plan.spec.node_pool),
                model=plan.spec.model_name,
                settings=settings,
                timeout_seconds=timeout,
                hf_token_secret=secret,
                hf_token_optional=optional,
            )
        except ValueError as e:  # unknown pool, model too large for the pool
            raise AirflowFailException(str(e)) from None

    def build_pod_operator(self, plan: StepPlan, context: Context | None = None) -> KubernetesPodOperator:
        """A plain `KubernetesPodOperator` with this step's pod for `plan` (to render and check the pod spec without a
        cluster: `operators.kubernetes.pod_manifest`)."""
        from operators.kubernetes import POD_OPERATOR_OPTIONS

        return KubernetesPodOperator(task_id=self.task_id, **self.pod_fields(plan, context), **POD_OPERATOR_OPTIONS)

    # ---- the pod's token Secret (operators.pod_secret)

    def _needs_token(self) -> bool:
        """A step that reads the hub, with a token in the Airflow connection (not a cluster-synced Secret)."""
        return self.step in CREDENTIAL_STEPS and not self._k8s_settings().hf_token_secret and bool(self._hf_token())

    def _secret_name(self, context: Context) -> str:
        from operators.pod_secret import secret_name

        ti = context["ti"]
        return secret_name(ti.dag_id, ti.run_id, ti.task_id, getattr(ti, "map_index", -1))

    def get_or_create_pod(self, pod_request_obj, context: Context):
        """The pod (created, or found again after a restart), with this try's token Secret made its dependent."""
        from operators import pod_secret

        if self._needs_token():
            self._hf_secret = self._secret_name(context)
            labels = {"app.kubernetes.io/name": "ckptflow", "ckptflow/step": self.step}
            pod_secret.create(self.client, self.namespace, self._hf_secret, self._hf_token(), labels)
        pod = super().get_or_create_pod(pod_request_obj, context)
        if self._hf_secret:  # the created pod as the API server has it (its uid)
            remote = self.client.read_namespaced_pod(pod.metadata.name, pod.metadata.namespace)
            pod_secret.adopt(self.client, self.namespace, self._hf_secret, remote)
        return pod

    def post_complete_action(self, *, pod, remote_pod, context: Context, result, **kwargs) -> None:
        try:
            super().post_complete_action(pod=pod, remote_pod=remote_pod, context=context, result=result, **kwargs)
        finally:
            self._delete_secret()

    def _delete_secret(self) -> None:
        from operators import pod_secret

        if self._hf_secret:
            try:
                pod_secret.delete(self.client, self.namespace, self._hf_secret)
            except Exception as e:  # the garbage collector removes it with the pod anyway
                self.log.warning("could not delete the token Secret %s: %s", self._hf_secret, e)
            self._hf_secret = None

    def _pod_run(self, plan: StepPlan, run) -> None:
        """Run (or resume) the pod, turning a failed container's exit status into the step's failure."""
        from operators.kubernetes import container_exit_code

        try:
            run()
        except AirflowFailException:
            raise
        except AirflowException as e:
            pod = self.remote_pod or self.pod
            code = container_exit_code(pod, self.base_container_name)
            if code is None:  # never ran to an end (scheduling, image pull, API errors): retry
                raise
            self.on_command_failure(plan, code, str(e).splitlines()[0])

    def on_kill(self) -> None:
        if self._runner is not None:
            self._runner.terminate()
        elif self.pod is not None:
            super().on_kill()  # deletes the pod (and with it the token Secret)
            self._delete_secret()

    # --------------------------------------------------------------------------------------- OpenLineage

    def _lineage(self):
        if self._plan is None:
            return None
        return lineage.operator_lineage(self.step, self._plan.inlets, self._plan.outlets, self._extras)

    def get_openlineage_facets_on_start(self):
        return self._lineage()

    def get_openlineage_facets_on_complete(self, task_instance):
        return self._lineage()

    def get_openlineage_facets_on_failure(self, task_instance):
        return self._lineage()


class PartStepOperator(CkptflowStepOperator):
    """A step mapped over the run's part indices: one task instance per part (`.expand(part=part_indices())`)."""

    def __init__(self, *, part: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.part = part  # set per mapped task instance


class DownloadOperator(PartStepOperator):
    """Stage the source model in the run's work folder (`ckptflow download`): safetensors, config and
    tokenizer only, the hub revision resolved to a commit sha, written atomically; with the run's `parts` N > 1,
    this task instance fetches part `part` of N of the weight files (`--part I/N`; nothing for a local folder) and
    download_finalize publishes the staged source."""

    step = "download"


class DownloadFinalizeOperator(CkptflowStepOperator):
    """Complete a split download (`ckptflow download --finalize`: every part's files present and checked, the
    small files fetched, the staged source and its `ckptflow-download.json` moved into place at once). Nothing to
    do when the run downloads in one part."""

    step = DOWNLOAD_FINALIZE


class ConvertOperator(PartStepOperator):
    """Convert the staged model (`ckptflow convert --to maxtext|hf`) into the run's work folder; with the run's
    `parts` N > 1, this task instance converts part `part` of N (`--part I/N`) and finalize assembles them."""

    step = "convert"


class FinalizeOperator(CkptflowStepOperator):
    """Assemble the parts of a split convert into the converted checkpoint (`ckptflow convert --finalize`:
    every part present and from this conversion, the checkpoint moved into place at once, the manifest written,
    the staging folder removed). Nothing to do when the run converts in one part."""

    step = FINALIZE


@task(task_id="plan_parts", retries=0)
def part_indices(params: dict | None = None) -> list[int]:
    """`[0, ..., parts - 1]` from the run's params: the mapped download and convert run one task instance per index."""
    try:
        return list(range(RunSpec.from_params(params or {}).parts))
    except ValueError as e:  # bad params: retrying cannot help
        raise AirflowFailException(f"invalid parameters: {e}") from None


class VerifyOperator(CkptflowStepOperator):
    """Prove the conversion (`ckptflow verify`: content, layout, precision); a failed verdict fails the run without
    retries, so the publish step never runs for an unverified checkpoint."""

    step = "verify"

    def before_run(self, plan: StepPlan) -> None:
        # A report left by an earlier try must not be mistaken for this try's verdict.
        if plan.spec.execution_mode == "local":
            shutil.rmtree(plan.layout.verify_dir, ignore_errors=True)

    def _verdict(self, plan: StepPlan) -> dict | None:
        return lineage.verify_metrics(read_result(plan.results["verify"]))

    def on_command_failure(self, plan: StepPlan, exit_code: int, message: str) -> None:
        metrics = self._verdict(plan)
        if metrics and metrics.get("passed") is False:
            raise AirflowFailException(
                f"verification failed: {_why_failed(metrics)} (report: {plan.layout.verify_dir}); "
                "the checkpoint is not published"
            )
        super().on_command_failure(plan, exit_code, message)

    def after_run(self, plan: StepPlan, results: dict[str, dict | None]) -> None:
        metrics = lineage.verify_metrics(results.get("verify"))
        if metrics is None:
            if plan.spec.execution_mode == "local":
                raise AirflowException(f"verify exited 0 but wrote no report in {plan.layout.verify_dir}")
            return  # a pod's report on a PVC is out of the worker's reach; the exit status decided
        if metrics.get("passed") is not True:
            raise AirflowFailException(f"verify exited 0 but its report does not say passed: {metrics}")


def _why_failed(metrics: dict) -> str:
    """Which part of verify's verdict failed, in words."""
    why = []
    if metrics.get("content_passed") is False:
        why.append("the checkpoint does not hold the source's weights (content)")
    if metrics.get("layout_passed") is False:
        why.append(f"MaxText does not compute the source model from it (layout: max KL {metrics.get('layout_kl_max')})")
    if metrics.get("precision_passed") is False or not why:
        why.append(f"max per-token KL {metrics.get('kl_max')} exceeds {metrics.get('max_kl_threshold')} (precision)")
    return "; ".join(why)


class PublishOperator(CkptflowStepOperator):
    """Copy the verified checkpoint to the destination (`ckptflow publish`): atomic, and a no-op when the
    destination already holds exactly this checkpoint."""

    step = "publish"


OPERATORS: dict[str, type[CkptflowStepOperator]] = {
    op.step: op for op in (DownloadOperator, ConvertOperator, VerifyOperator, PublishOperator)
}
assert tuple(OPERATORS) == STEPS

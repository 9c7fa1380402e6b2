# syntax=docker/dockerfile:1
#
# ckptflow Airflow image: Airflow 3.3 with the standard, cncf-kubernetes, openlineage and google providers, the
# pipeline (dags/), its operators (operators/ + the light parts of converters/ the DAG imports) and the
# Checkpoints UI plugin (plugins/). Use it for every Airflow component of the official Helm chart
# (docs/deploy.md).
#
#   docker build -f docker/airflow.Dockerfile -t ckptflow-airflow:0.1.0 .
#   docker build -f docker/airflow.Dockerfile --build-arg WITH_CONVERTER=true -t ckptflow-airflow:0.1.0-local .
#
# By default the workers only orchestrate: every step runs in a pod of the converter image
# (execution_mode=kubernetes). WITH_CONVERTER=true also installs the converter's libraries (jax CPU, orbax,
# torch CPU, transformers; see docker/requirements-converter.txt) so the workers can run steps themselves
# (execution_mode=local).
#
# Build context: the repository root (.dockerignore keeps it small).

ARG AIRFLOW_VERSION=3.3.2
ARG PYTHON_VERSION=3.11

FROM apache/airflow:slim-${AIRFLOW_VERSION}-python${PYTHON_VERSION}

ARG AIRFLOW_VERSION
ARG WITH_CONVERTER=false
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The official image's `airflow` user (uid 50000, group 0).
USER 50000
COPY --chown=50000:0 docker/requirements-airflow.txt docker/requirements-converter.txt /opt/ckptflow/requirements/

# Naming apache-airflow==AIRFLOW_VERSION on every install keeps pip from moving the image's Airflow.
RUN pip install --only-binary=:all: "apache-airflow==${AIRFLOW_VERSION}" \
        -r /opt/ckptflow/requirements/requirements-airflow.txt \
    && if [ "${WITH_CONVERTER}" = "true" ]; then \
        pip install --only-binary=:all: --extra-index-url "${TORCH_INDEX_URL}" "apache-airflow==${AIRFLOW_VERSION}" \
            -r /opt/ckptflow/requirements/requirements-airflow.txt \
            -r /opt/ckptflow/requirements/requirements-converter.txt \
        && python -c "import torch; assert torch.version.cuda is None, 'CUDA build of torch: ' + torch.__version__"; \
    fi

# The `operators` and `converters` packages (and the `ckptflow` console script), without their heavy
# dependencies: DAG parsing and the plugin import only their light modules.
COPY --chown=50000:0 pyproject.toml README.md /opt/ckptflow/src/
COPY --chown=50000:0 converters/ /opt/ckptflow/src/converters/
COPY --chown=50000:0 operators/ /opt/ckptflow/src/operators/
RUN pip install --no-deps /opt/ckptflow/src \
    && python -c "import operators.ckptflow_operators, converters.core.registry"

COPY --chown=50000:0 dags/ /opt/airflow/dags/
COPY --chown=50000:0 plugins/ /opt/airflow/plugins/

# Fail the build if the DAG or the plugin does not load.
RUN AIRFLOW__CORE__LOAD_EXAMPLES=False python - <<'EOF'
from airflow import plugins_manager
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder="/opt/airflow/dags")
assert not bag.import_errors, bag.import_errors
assert "convert_checkpoint" in bag.dag_ids, bag.dag_ids
plugins_manager.ensure_plugins_loaded()
assert not plugins_manager.get_import_errors(), plugins_manager.get_import_errors()
assert any(p["name"] == "ckptflow" for p in plugins_manager.get_plugin_info()), "ckptflow plugin not loaded"
EOF

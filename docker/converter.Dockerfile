# syntax=docker/dockerfile:1
#
# ckptflow converter image: the `ckptflow` command and its pinned libraries, nothing else (no Airflow).
# The pipeline's step pods run `ckptflow <step> ...` in it (operators/kubernetes.py: cmds=["ckptflow"]);
# `docker run IMAGE convert SRC OUT --to maxtext` works the same way by hand.
#
#   docker build -f docker/converter.Dockerfile -t ckptflow-converter:0.1.0 .
#   docker build -f docker/converter.Dockerfile --build-arg ACCELERATOR=tpu -t ckptflow-converter:0.1.0-tpu .
#
# Build context: the repository root (.dockerignore keeps it small). ACCELERATOR=cpu installs
# docker/requirements-converter.txt (jax CPU); ACCELERATOR=tpu installs docker/requirements-converter-tpu.txt
# (the same plus jax[tpu] and libtpu). torch is always the CPU build: only `ckptflow verify` uses it, for the
# Hugging Face side of the logits comparison.

ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# ------------------------------------------------------------------------------------------- build stage
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build

ARG ACCELERATOR=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN python -m venv /opt/ckptflow
ENV PATH=/opt/ckptflow/bin:$PATH

WORKDIR /src
COPY docker/requirements-converter.txt docker/requirements-converter-tpu.txt docker/

# Wheels only (nothing is compiled). The PyTorch CPU index serves torch 2.13.0+cpu, which satisfies the pin and
# wins over PyPI's CUDA build of the same version; the checks after the install fail the build if a CUDA build
# or CUDA libraries came in anyway.
RUN case "${ACCELERATOR}" in \
        cpu) req=docker/requirements-converter.txt ;; \
        tpu) req=docker/requirements-converter-tpu.txt ;; \
        *) echo "ACCELERATOR must be cpu or tpu, not '${ACCELERATOR}'" >&2; exit 1 ;; \
    esac \
    && pip install --only-binary=:all: --extra-index-url "${TORCH_INDEX_URL}" -r "${req}" \
    && python -c "import torch; assert torch.version.cuda is None, 'CUDA build of torch: ' + torch.__version__" \
    && if pip list --format=freeze | grep -i '^nvidia-'; then echo "CUDA libraries in the image" >&2; exit 1; fi

# ckptflow itself: the `converters` package and its `ckptflow` console script (operators/ is Airflow code and
# stays out of this image).
COPY pyproject.toml README.md ./
COPY converters/ converters/
RUN pip install --no-deps . \
    && pip check \
    && ckptflow models > /dev/null

# ----------------------------------------------------------------------------------------- runtime stage
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}

ARG ACCELERATOR=cpu
LABEL org.opencontainers.image.title="ckptflow-converter" \
      org.opencontainers.image.description="ckptflow: Hugging Face safetensors <-> MaxText (Orbax) checkpoint conversion and logits verification" \
      io.ckptflow.accelerator="${ACCELERATOR}"

COPY --from=build /opt/ckptflow /opt/ckptflow

# Caches in /tmp so the image also runs with a read-only root filesystem plus an emptyDir on /tmp.
ENV PATH=/opt/ckptflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/tmp/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CKPTFLOW_ACCELERATOR=${ACCELERATOR}

# A fixed non-root user (uid 1000, group 0): the pods' work volume must be writable by it (docs/deploy.md).
RUN useradd --uid 1000 --gid 0 --create-home --shell /usr/sbin/nologin ckptflow
USER 1000
WORKDIR /home/ckptflow

ENTRYPOINT ["ckptflow"]
CMD ["--help"]

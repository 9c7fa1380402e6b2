"""What the images install, without Docker:

* the converter image's requirement set installs into a throwaway venv (Python 3.11, wheels only, as the
  Dockerfile does), ckptflow installs beside it from the files the Dockerfile copies, and its `ckptflow`
  entrypoint runs every pipeline step there exactly as a step pod does (`operators.commands.step_args`);
* the other sets resolve with pip (`pip install --dry-run --ignore-installed --only-binary=:all: --report`,
  a full resolve with dependencies, against the package index this machine's pip uses): the Airflow image
  and the converter image's TPU variant. (The Airflow image with WITH_CONVERTER=true adds the converter set,
  whose pins are the root requirements.txt's, installed together with Airflow in the project's own venv.)
* the Airflow image parses the DAGs and loads the plugin with what it installs (no converter stack).

The venv takes about 30 s to build on this machine; the two resolves then run in the background while the
pipeline steps run in the venv (about 45 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from dockerfiles import AIRFLOW, CONVERTER, CONVERTER_TPU, REPO, dists_of_module, imported_modules, pins, third_party
from packaging.utils import canonicalize_name

PIP = [sys.executable, "-m", "pip"]
RESOLVES = {
    "airflow": [AIRFLOW],
    "converter-tpu": [CONVERTER_TPU],
}


@pytest.fixture(scope="module")
def resolves(tmp_path_factory):
    """Start the dry-run resolves at once; each test waits for the one it needs."""
    out = tmp_path_factory.mktemp("resolves")
    procs = {}
    for name, files in RESOLVES.items():
        report = out / f"{name}.json"
        cmd = [
            *PIP,
            "install",
            "--dry-run",
            "--ignore-installed",
            "--only-binary=:all:",
            "--quiet",
            "--report",
            str(report),
        ]
        for f in files:
            cmd += ["-r", str(f)]
        log = open(out / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs[name] = (proc, report, log)

    def result(name: str) -> dict[str, str]:
        proc, report, log = procs[name]
        try:
            code = proc.wait(timeout=600)
        finally:
            log.close()
        text = (out / f"{name}.log").read_text(errors="replace")
        assert code == 0, f"pip could not resolve the {name} image's requirements:\n{text[-4000:]}"
        data = json.loads(report.read_text())
        return {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"] for i in data["install"]}

    yield result
    for proc, _, log in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kw)
    assert out.returncode == 0, (
        f"{' '.join(map(str, cmd))} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out


@pytest.fixture(scope="module")
def converter_venv():
    """A venv with exactly what the converter image installs: docker/requirements-converter.txt (wheels only),
    then ckptflow with --no-deps from a copy of the files the Dockerfile copies."""
    root = Path(tempfile.mkdtemp(prefix="ckptflow-converter-image-"))
    try:
        venv = root / "venv"
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
        python = venv / "bin" / "python"
        # --no-compile: byte-compiling 1.9 GB of packages takes longer than the install itself.
        _run(
            [
                *PIP,
                "--python",
                str(python),
                "install",
                "--quiet",
                "--no-compile",
                "--only-binary=:all:",
                "-r",
                str(CONVERTER),
            ],
            timeout=900,
        )
        src = root / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, src / name)
        shutil.copytree(REPO / "converters", src / "converters", ignore=shutil.ignore_patterns("__pycache__"))
        _run([*PIP, "--python", str(python), "install", "--quiet", "--no-compile", "--no-deps", str(src)], timeout=300)
        yield venv
    finally:
        # ~2 GB in ~100k files takes 20-30 s to delete: leave it to a background `rm` that ends by itself.
        subprocess.Popen(
            ["rm", "-rf", str(root)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


def test_converter_image_runs_every_pipeline_step(converter_venv, resolves, tiny_model, tmp_path):
    # (`resolves` starts the dry-run resolves now: they run while the steps below do.)
    from operators.commands import POD_ENTRYPOINT, STEP_ENV, STEPS, RunSpec, WorkLayout, step_args

    bin_dir = converter_venv / "bin"
    python = bin_dir / "python"
    entry = bin_dir / POD_ENTRYPOINT[0]
    assert entry.exists(), f"no {POD_ENTRYPOINT[0]} console script in the image's venv"
    _run([*PIP, "--python", str(python), "check"], timeout=120)
    installed = json.loads(_run([*PIP, "--python", str(python), "list", "--format=json"], timeout=120).stdout)
    names = {canonicalize_name(d["name"]): d["version"] for d in installed}
    assert not [n for n in names if n.startswith("apache-airflow")], "Airflow in the converter image"
    for name, (version, _) in pins(CONVERTER).items():
        assert names[name].split("+")[0] == version, (name, names[name])
    no_airflow = subprocess.run([str(python), "-c", "import airflow"], capture_output=True, timeout=60)
    assert no_airflow.returncode != 0

    # What a step pod sees: only the image's environment, STEP_ENV and JAX on CPU.
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
        **STEP_ENV,
    }
    help_text = _run([str(entry), "--help"], env=env, timeout=120).stdout
    assert "convert" in help_text and "verify" in help_text
    source = tiny_model("llama3.1")

    dest = tmp_path / "published" / "v1"
    spec = RunSpec(source=str(source), destination=dest.as_uri(), dtype="float32")
    layout = WorkLayout.for_run(str(tmp_path / "work"), "convert_checkpoint", "manual__image-test")
    Path(layout.root).mkdir(parents=True)
    for step in STEPS:
        _run([str(entry), *step_args(step, spec, layout)], env=env, cwd=layout.root, timeout=600)

    report = json.loads((Path(layout.verify_dir) / "verify.json").read_text())
    assert report["summary"]["passed"] is True
    assert (Path(layout.verify_dir) / "kl_per_token.png").stat().st_size > 10_000
    receipt = json.loads(Path(layout.publish_receipt).read_text())
    assert receipt["status"] == "published" and (dest / "0" / "items").is_dir()


def test_airflow_image_requirements_resolve(resolves):
    got = resolves("airflow")
    for name, (version, _) in pins(AIRFLOW).items():
        assert got.get(name) == version, (name, got.get(name))
    for heavy in ("jax", "jaxlib", "torch", "transformers", "orbax-checkpoint"):
        assert heavy not in got, f"{heavy} would be in the default Airflow image"


def test_converter_tpu_image_resolves(resolves):
    got = resolves("converter-tpu")
    for name, (version, _) in pins(CONVERTER_TPU).items():
        assert got.get(name, "").split("+")[0] == version, (name, got.get(name))
    assert "apache-airflow" not in got


def test_airflow_image_parses_the_dags_and_loads_the_plugin_with_what_it_installs(resolves, tmp_path):
    """Import every DAG file and the plugin in a fresh interpreter and note which of the project's modules that
    loads. Everything those modules import must be installed by the Airflow image (without WITH_CONVERTER): all
    imports of operators/, dags/ and plugins/ (they run in Airflow's processes), and the module-level imports of
    the converters/ modules they load (their functions run in the step pods)."""
    code = textwrap.dedent(f"""
        import importlib.util, json, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO / "plugins")!r})
        for i, f in enumerate(sorted(Path({str(REPO / "dags")!r}).glob("*.py"))):
            spec = importlib.util.spec_from_file_location(f"dag_{{i}}", f)
            sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        import ckptflow_plugin, ckptflow_ui.collect, ckptflow_ui.app
        print(json.dumps(sorted({{getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}})))
    """)
    env = {**os.environ, "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW_HOME": str(tmp_path)}
    out = _run([sys.executable, "-c", code], env=env, timeout=300)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    ours = [
        Path(f)
        for f in loaded
        if f.endswith(".py")
        and f.startswith(str(REPO) + "/")
        and Path(f).relative_to(REPO).parts[0] in ("converters", "operators", "dags", "plugins")
    ]
    assert any(p.name == "ckptflow_plugin.py" for p in ours) and any(p.parent.name == "dags" for p in ours)

    image = set(resolves("airflow"))
    outside = {}
    for path in ours:
        rel = path.relative_to(REPO).as_posix()
        module_level_only = rel.startswith("converters/")
        for module in third_party(imported_modules(path, module_level_only=module_level_only)):
            dists = dists_of_module(module)
            if not dists & image:
                outside.setdefault(rel, {})[module] = sorted(dists)
    assert not outside, f"imported by the Airflow side but not installed in the Airflow image: {outside}"

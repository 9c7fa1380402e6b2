"""Shared helpers of the reliability suite: a mid-sized synthetic model and checks of a finished output."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from blake3 import blake3

from converters.outputs.manifest import MANIFEST

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> list[str]:
    """The real command line, as a separate process."""
    return [sys.executable, "-m", "converters", *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def siblings(out: Path) -> list[str]:
    """Hidden entries ckptflow keeps beside `out` (temp folders, replaced versions, lock files)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.ckptflow-"))


def tree_bytes(root: Path) -> int:
    """Bytes of the files under `root` now (files may vanish while it is counted: a writer renames them)."""
    total = 0
    for p in root.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def check_complete(out: Path) -> dict:
    """`out` is a finished ckptflow output: its manifest lists exactly the files present, every digest right."""
    manifest = json.loads((out / MANIFEST).read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert on_disk == set(manifest["outputs"]), sorted(on_disk ^ set(manifest["outputs"]))[:5]
    for rel, meta in manifest["outputs"].items():
        assert (out / rel).stat().st_size == meta["bytes"], rel
        assert blake3((out / rel).read_bytes()).hexdigest() == meta["blake3"], rel
    return manifest


@pytest.fixture(scope="session")
def synthetic_llama(tmp_path_factory):
    """An 8-layer Llama with hidden 256 and vocab 8192 (18 MB in bf16): long enough to interrupt."""
    from converters.tiny_models import tiny_config, write_synthetic_checkpoint

    cfg = tiny_config("llama3.1", layers=8, vocab=8192)
    cfg.update(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("synthetic") / "llama8", cfg, seed=1)


@pytest.fixture(scope="session")
def rel():
    """The helpers above, for test modules (imported with --import-mode=importlib, they cannot import conftest)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        cli=cli, child_env=child_env, siblings=siblings, check_complete=check_complete, tree_bytes=tree_bytes, repo=REPO
    )


from tests.airflow_fixtures import airflow_db, convert_dag  # noqa: E402,F401  (fixtures: Airflow on a throwaway home)

"""Pytest fixtures for the stand-ins: import them into a test module (`from tests.stand_ins.fixtures import hub`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.stand_ins.hub_server import HubServer
from tests.stand_ins.kube_api import kube_env  # noqa: F401  (re-exported: tests import it from here)

TOKEN = "hf_SENTINELtokenDoNotPrint0123456789"


def hub_env(url: str, home: Path) -> dict[str, str]:
    """Environment for a `ckptflow` child process talking to the stand-in hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN",)}
    env.update(
        HF_ENDPOINT=url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HOME=str(home), HF_HUB_DISABLE_PROGRESS_BARS="1"
    )
    return env


@pytest.fixture
def hub(monkeypatch, tmp_path_factory):
    """A hub stand-in on 127.0.0.1 that the real `huggingface_hub` client in this process talks to."""
    from huggingface_hub import constants

    from converters.remote import hub as hub_lib

    home = tmp_path_factory.mktemp("hf-home")
    with HubServer(tokens=(TOKEN,)) as server:
        for k, v in hub_env(server.url, home).items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
        monkeypatch.setattr(hub_lib, "BACKOFF_BASE", 0.01)
        server.home = home
        yield server


@pytest.fixture(scope="session")
def converted(tmp_path_factory, tiny_model):
    """A real converted checkpoint (tiny llama, MaxText) staged through `ckptflow download` from the stand-in."""
    from huggingface_hub import constants

    from converters.convert import hf_to_maxtext
    from converters.remote.download import download

    root = tmp_path_factory.mktemp("converted")
    src = tiny_model("llama3.1")
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    mp = pytest.MonkeyPatch()
    with HubServer() as server:
        for k, v in hub_env(server.url, root).items():
            mp.setenv(k, v)
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        sha = server.state.commit("meta-llama/Tiny-3.1", files)
        download("meta-llama/Tiny-3.1", root / "staged")
    mp.undo()
    hf_to_maxtext(root / "staged", root / "mt", dtype="float32")
    return root / "mt", sha


def model_files(*, seed: int = 0, sharded: bool = True, extras: bool = True) -> dict[str, bytes]:
    """The files of a small HF model repo (safetensors, index, config, tokenizer; pickles and a README too)."""
    import tempfile

    from converters.io.safetensors import save_file

    rng = np.random.default_rng(seed)
    a = {"model.embed_tokens.weight": rng.standard_normal((64, 32), dtype=np.float32)}
    b = {"lm_head.weight": rng.standard_normal((64, 32), dtype=np.float32)}
    files: dict[str, bytes] = {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 32}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
        "generation_config.json": b'{"bos_token_id": 1}',
    }
    with tempfile.TemporaryDirectory() as tmp:
        if sharded:
            save_file(Path(tmp, "m1.safetensors"), a)
            save_file(Path(tmp, "m2.safetensors"), b)
            files["model-00001-of-00002.safetensors"] = Path(tmp, "m1.safetensors").read_bytes()
            files["model-00002-of-00002.safetensors"] = Path(tmp, "m2.safetensors").read_bytes()
            wm = {
                **{k: "model-00001-of-00002.safetensors" for k in a},
                **{k: "model-00002-of-00002.safetensors" for k in b},
            }
            files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": wm}).encode()
        else:
            save_file(Path(tmp, "m.safetensors"), {**a, **b})
            files["model.safetensors"] = Path(tmp, "m.safetensors").read_bytes()
    if extras:
        files.update({"pytorch_model.bin": b"PICKLE" * 100, "README.md": b"# tiny", "original/consolidated.pth": b"x"})
    return files


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def gcs(monkeypatch):
    """The `gcp-storage-emulator` package serving GCS on 127.0.0.1 (in memory, bucket `ckptflow-test`); the real
    google-cloud-storage client in this process (and child processes given `os.environ`) talks to it."""
    import logging

    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    server = create_server("127.0.0.1", 0, in_memory=True, default_bucket="ckptflow-test")
    server.start()
    try:
        port = server._api._httpd.server_address[1]
        url = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "ckptflow-test")
        server.url = url
        yield server
    finally:
        server.stop()


def gcs_objects(bucket: str, prefix: str = "") -> dict[str, bytes]:
    from google.cloud import storage

    client = storage.Client()
    return {b.name: b.download_as_bytes() for b in client.list_blobs(bucket, prefix=prefix)}


@pytest.fixture
def kube(monkeypatch, tmp_path_factory):
    """The Kubernetes API stand-in (tests/stand_ins/kube_api.py) on 127.0.0.1, its pods run as local processes.

    The `kubernetes_default` Airflow connection points at it (see `kube_env`; KUBECONFIG is left alone), so the
    cncf.kubernetes provider in this process talks to it; the clients' default kubeconfig location is patched too
    (`kubernetes.config.load_kube_config()`), and `kube.kubeconfig` is the file. Namespaces: default, kube-system,
    ckptflow. Register images with
    `kube.add_image(name, argv)`. Everything it started (pods' processes, threads, the HTTP server) is stopped after."""
    import kubernetes.config.kube_config as sync_kube_config
    import kubernetes_asyncio.config.kube_config as async_kube_config

    from tests.stand_ins.kube_api import KubeApiServer

    namespaces = ("default", "kube-system", "ckptflow")  # ckptflow: operators.kubernetes' default namespace
    with KubeApiServer(tmp_path_factory.mktemp("kube"), namespaces=namespaces) as server:
        for k, v in kube_env(server.kubeconfig).items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("KUBECONFIG", raising=False)
        monkeypatch.setattr(sync_kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(server.kubeconfig))
        monkeypatch.setattr(async_kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(server.kubeconfig))
        yield server

"""`ckptflow download`: file selection, atomic and idempotent staging, refusals, hub flow (local stand-in hub)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from converters.cli.main import main
from converters.errors import CkptflowError
from converters.io.files import digest_of, tree_files
from converters.io.safetensors import save_file
from converters.remote import download as dl
from tests.stand_ins.fixtures import hub, model_files  # noqa: F401  (fixture)


def make_hf_folder(root: Path, *, sharded: bool = False, extras: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    (root / "tokenizer.json").write_text("{}")
    a = {"model.embed_tokens.weight": np.arange(8, dtype=np.float32).reshape(2, 4)}
    b = {"lm_head.weight": np.ones((2, 4), dtype=np.float32)}
    if sharded:
        save_file(root / "model-00001-of-00002.safetensors", a)
        save_file(root / "model-00002-of-00002.safetensors", b)
        wm = {
            **{k: "model-00001-of-00002.safetensors" for k in a},
            **{k: "model-00002-of-00002.safetensors" for k in b},
        }
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    else:
        save_file(root / "model.safetensors", {**a, **b})
    for name in extras:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x" * 10)
    return root


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


def test_local_copy_takes_only_what_conversion_needs(tmp_path):
    src = make_hf_folder(tmp_path / "src", extras=("pytorch_model.bin", "README.md", "original/consolidated.pth"))
    manifest, copied = dl.download(str(src), tmp_path / "out")
    assert copied
    assert files_in(tmp_path / "out") == {"config.json", "tokenizer.json", "model.safetensors", dl.MANIFEST_NAME}
    assert manifest["kind"] == "local" and manifest["revision"] is None
    assert manifest["source"] == src.resolve().as_uri()
    assert manifest["digest"] == digest_of(tree_files(tmp_path / "out", exclude=[dl.MANIFEST_NAME]))
    assert siblings(tmp_path / "out") == []  # no temporary folder left behind


def test_sharded_source_copies_the_indexed_shards_only(tmp_path):
    src = make_hf_folder(tmp_path / "src", sharded=True)
    save_file(src / "consolidated.safetensors", {"x": np.zeros(2, dtype=np.float32)})  # Mistral-style duplicate
    dl.download(str(src), tmp_path / "out")
    assert files_in(tmp_path / "out") == {
        "config.json",
        "tokenizer.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        dl.MANIFEST_NAME,
    }


def test_second_run_is_a_no_op_and_a_changed_source_replaces_the_copy(tmp_path):
    src = make_hf_folder(tmp_path / "src")
    out = tmp_path / "out"
    first, _ = dl.download(str(src), out)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    again, copied = dl.download(str(src), out)
    assert not copied and again == first
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    (src / "tokenizer.json").write_text('{"changed": true}')
    changed, copied = dl.download(str(src), out)
    assert copied and changed["digest"] != first["digest"]
    assert json.loads((out / "tokenizer.json").read_text()) == {"changed": True}


def test_a_damaged_copy_is_never_trusted(tmp_path):
    src = make_hf_folder(tmp_path / "src")
    out = tmp_path / "out"
    dl.download(str(src), out)
    with open(out / "model.safetensors", "r+b") as f:  # truncated behind our back
        f.truncate(100)
    _, copied = dl.download(str(src), out)
    assert copied
    assert (out / "model.safetensors").stat().st_size == (src / "model.safetensors").stat().st_size


def test_a_broken_source_leaves_no_output_and_no_temp_folder(tmp_path):
    src = make_hf_folder(tmp_path / "src")
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CkptflowError):
        dl.download(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert siblings(tmp_path / "out") == []


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    src = make_hf_folder(tmp_path / "src")
    dead = tmp_path / ".out.ckptflow-tmp-999999999-deadbeef"  # pid that cannot exist
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    dl.download(str(src), tmp_path / "out")
    assert not dead.exists()


@pytest.mark.parametrize(
    "names, message",
    [
        (("pytorch_model.bin", "config.json"), "only pickled weights"),
        (("config.json",), "no *.safetensors"),
        (("model.safetensors",), "no config.json"),
    ],
)
def test_refusals(tmp_path, names, message):
    src = tmp_path / "src"
    src.mkdir()
    for n in names:
        (src / n).write_bytes(b"{}")
    with pytest.raises(CkptflowError, match=message.replace("*", r"\*")):
        dl.download(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    src = make_hf_folder(tmp_path / "src", sharded=True)
    (src / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CkptflowError, match="missing: model-00002-of-00002"):
        dl.download(str(src), tmp_path / "out")


def test_revision_is_for_hub_repos_only(tmp_path):
    src = make_hf_folder(tmp_path / "src")
    with pytest.raises(CkptflowError, match="hub repos only"):
        dl.download(str(src), tmp_path / "out", revision="main")


def test_output_inside_the_source_is_refused(tmp_path):
    src = make_hf_folder(tmp_path / "src")
    with pytest.raises(CkptflowError, match="must not be the source"):
        dl.download(str(src), src / "copy")


def test_maxtext_format_copies_the_whole_checkpoint(tmp_path):
    src = tmp_path / "ckpt"
    (src / "0" / "items" / "d").mkdir(parents=True)
    (src / "0" / "items" / "_METADATA").write_text("{}")
    (src / "0" / "items" / "d" / "blob").write_bytes(b"abc")
    (src / "ckptflow-manifest.json").write_text("{}")
    manifest, _ = dl.download(f"file://{src}", tmp_path / "out", fmt="maxtext")
    assert files_in(tmp_path / "out") == {
        "0/items/_METADATA",
        "0/items/d/blob",
        "ckptflow-manifest.json",
        dl.MANIFEST_NAME,
    }
    assert manifest["format"] == "maxtext"
    with pytest.raises(CkptflowError, match="not an Orbax"):
        dl.download(str(make_hf_folder(tmp_path / "hf")), tmp_path / "out2", fmt="maxtext")


def test_source_kind_is_decided_like_from_pretrained(tmp_path, monkeypatch):
    assert dl.is_local_source("/abs/path") and dl.is_local_source("file:///x") and dl.is_local_source("./rel")
    assert not dl.is_local_source("meta-llama/Llama-3.1-8B")
    make_hf_folder(tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert dl.is_local_source("org/name")  # an existing folder wins, as in transformers
    assert not dl.looks_local("org/name")


def test_hub_download_through_the_cli(hub, tmp_path, capsys):
    """The hub path end to end through the CLI (more in tests/remote/test_hub.py): pinned sha, JSON manifest,
    refusals."""
    sha = hub.state.commit("acme/tiny", model_files())
    assert main(["download", "acme/tiny", str(tmp_path / "out"), "--revision", "main", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["revision"] == sha and printed["kind"] == "hub"
    assert files_in(tmp_path / "out") == {
        "config.json",
        "tokenizer.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        dl.MANIFEST_NAME,
    }
    assert main(["download", "acme/tiny", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("already up to date: hf://acme/tiny@" + sha)
    hub.state.commit("acme/pickles", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    assert main(["download", "acme/pickles", str(tmp_path / "p")]) == 2
    assert "only pickled weights" in capsys.readouterr().err
    assert not any(p.endswith(".bin") for _, p in hub.state.requests)


def test_cli_exit_status_and_output(tmp_path, capsys):
    src = make_hf_folder(tmp_path / "src")
    assert main(["download", str(src), str(tmp_path / "out"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["digest"].startswith("sha256:")
    assert main(["download", str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["download", "not a repo!", str(tmp_path / "o3")]) == 2
    assert "not a local folder" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o3")

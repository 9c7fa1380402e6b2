"""Bad input ends in one clear cause, and nothing is left where the output was to go."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.errors import CkptflowError, CorruptFileError, MappingError, OutputExistsError, UnsupportedModelError
from converters.io.safetensors import SafetensorsFolder, save_file


def copy_model(tiny_model, tmp_path, family="llama3.1"):
    src = tmp_path / "src"
    shutil.copytree(tiny_model(family), src)
    return src


def rewrite(src, edit):
    f = SafetensorsFolder(src)
    tensors = {n: f.read(n) for n in f.tensors}
    edit(tensors)
    (src / "model.safetensors").unlink()
    save_file(src / "model.safetensors", tensors)


def assert_nothing_left(tmp_path, name="out"):
    assert not (tmp_path / name).exists()
    assert not [p for p in tmp_path.iterdir() if ".ckptflow-" in p.name]


def test_unknown_architecture_lists_supported(tiny_model, tmp_path):
    src = copy_model(tiny_model, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2'.*supported model types: llama \(llama3.1\)"):
        hf_to_maxtext(src, tmp_path / "out")
    assert_nothing_left(tmp_path)


def test_missing_tensor_is_named(tiny_model, tmp_path):
    src = copy_model(tiny_model, tmp_path)
    rewrite(src, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(MappingError, match=r"missing tensors .*model\.layers\.1\.mlp\.down_proj\.weight"):
        hf_to_maxtext(src, tmp_path / "out")
    assert_nothing_left(tmp_path)


def test_unexpected_tensor_is_named(tiny_model, tmp_path):
    src = copy_model(tiny_model, tmp_path)
    rewrite(
        src, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(128, t["model.norm.weight"].dtype)})
    )
    with pytest.raises(MappingError, match=r"unexpected tensors .*q_proj\.bias"):
        hf_to_maxtext(src, tmp_path / "out")
    assert_nothing_left(tmp_path)


def test_shape_mismatch_names_expected_and_got(tiny_model, tmp_path):
    src = copy_model(tiny_model, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MappingError, match=r"gate_proj\.weight \(expected \[128, 64\], got \[96, 64\]\)"):
        hf_to_maxtext(src, tmp_path / "out")
    assert_nothing_left(tmp_path)


def test_wrong_family_config_for_tensors(tiny_model, tmp_path):
    """A Qwen3 config over Llama tensors: q/k norms missing, named."""
    src = copy_model(tiny_model, tmp_path)
    cfg = json.loads((tiny_model("qwen3", tied=False) / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MappingError, match="q_norm"):
        hf_to_maxtext(src, tmp_path / "out")


def test_missing_config_field(tiny_model, tmp_path):
    src = copy_model(tiny_model, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CkptflowError, match="missing 'hidden_size'"):
        hf_to_maxtext(src, tmp_path / "out")


def test_truncated_safetensors(tiny_model, tmp_path):
    src = copy_model(tiny_model, tmp_path)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:-1000])
    with pytest.raises(CorruptFileError, match="truncated"):
        hf_to_maxtext(src, tmp_path / "out")
    assert_nothing_left(tmp_path)


def test_existing_output_refused_unless_overwrite(tiny_model, tmp_path):
    src = tiny_model("qwen3")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        hf_to_maxtext(src, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    hf_to_maxtext(src, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "0" / "items").is_dir() and not (tmp_path / "out" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".ckptflow-" in p.name]


def test_failure_midway_leaves_no_output(tiny_model, tmp_path, monkeypatch):
    """A read error during writing: the temp folder is removed and the destination never appears."""
    src = tiny_model("llama3.1", layers=3)
    from converters.io import safetensors as safetensors_io

    real = safetensors_io.read_tensor
    calls = {"n": 0}

    def flaky(info, rows=None):
        calls["n"] += 1
        if calls["n"] == 10:
            raise CorruptFileError("simulated read failure")
        return real(info, rows)

    monkeypatch.setattr(safetensors_io, "read_tensor", flaky)
    with pytest.raises(Exception, match="simulated read failure"):
        hf_to_maxtext(src, tmp_path / "out")
    assert_nothing_left(tmp_path)


def test_checkpoint_shape_mismatch_against_model(tiny_model, tmp_path):
    hf_to_maxtext(tiny_model("qwen3"), tmp_path / "mt")
    with pytest.raises(MappingError, match="shape mismatch|missing arrays"):
        maxtext_to_hf(tmp_path / "mt", tmp_path / "out", model="qwen3-0.6b")
    assert_nothing_left(tmp_path)


def test_checkpoint_missing_array(tiny_model, tmp_path):
    src = tiny_model("qwen3", tied=False)
    hf_to_maxtext(src, tmp_path / "mt")
    cfg = json.loads((src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True  # now the checkpoint has an array the config does not
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MappingError, match="logits_dense"):
        maxtext_to_hf(tmp_path / "mt", tmp_path / "out", hf_config=str(tmp_path / "cfg.json"))
    assert_nothing_left(tmp_path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CkptflowError, match="not an Orbax checkpoint"):
        maxtext_to_hf(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(CkptflowError, match="no such checkpoint"):
        maxtext_to_hf(tmp_path / "nope", tmp_path / "out")


def test_stale_temp_from_killed_run_is_cleaned(tiny_model, tmp_path):
    stale = tmp_path / ".out.ckptflow-tmp-999999999-deadbeef"
    stale.mkdir()
    (stale / "junk").write_text("x")
    hf_to_maxtext(tiny_model("qwen3"), tmp_path / "out")
    assert not stale.exists()

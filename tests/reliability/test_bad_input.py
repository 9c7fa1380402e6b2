"""Bad input not covered elsewhere: every config field missing or mistyped, NaN/Inf weights reported by
tensor name, damaged Orbax storage, pickles and remote code refused.

Already covered (not repeated here): wrong family for the tensors, missing/unexpected tensors, shape
mismatches, a missing `hidden_size`, truncated safetensors, Orbax arrays missing or of the wrong shape
(tests/test_errors.py); corrupt safetensors headers and pickle-only folders (tests/io/test_safetensors.py);
DAG params of the wrong type or value (tests/dags/test_convert_checkpoint.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters.errors import CkptflowError
from converters.io.safetensors import SafetensorsFolder, save_file


class _Stop(Exception):
    """Raised instead of writing: everything before the first write (config, plan, validation) has run."""


@pytest.fixture
def stop_before_writing(monkeypatch):
    from converters.io import orbax as orbax_io

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(orbax_io, "write_checkpoint", stop)


def _fields(cfg: dict) -> list[str]:
    return sorted(cfg)


@pytest.mark.parametrize("family", ["llama3.1", "qwen3"])
def test_each_config_field_missing_or_mistyped_is_a_clear_error_or_harmless(
    tiny_model, tmp_path, family, stop_before_writing
):
    """Delete each field of config.json in turn, then set each to a string, a list, null, -1: the converter ends in a
    CkptflowError naming the problem or reaches the writing stage; never a KeyError/TypeError traceback."""
    from converters.convert import hf_to_maxtext

    src = tmp_path / "src"
    shutil.copytree(tiny_model(family), src)
    base = json.loads((src / "config.json").read_text())
    outcomes = {}
    for field in _fields(base):
        for label, edit in [("missing", None), ("string", "x"), ("list", [1]), ("null", None), ("negative", -1)]:
            cfg = dict(base)
            if label == "missing":
                del cfg[field]
            else:
                cfg[field] = edit
            (src / "config.json").write_text(json.dumps(cfg))
            try:
                hf_to_maxtext(src, tmp_path / "out")
                outcomes[(field, label)] = "converted"  # cannot happen: writing is stopped
            except _Stop:
                outcomes[(field, label)] = "accepted"
            except CkptflowError as e:
                assert "\n" not in str(e), str(e)
                outcomes[(field, label)] = "refused"
    refused = {k for k, v in outcomes.items() if v == "refused"}
    for field in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "intermediate_size",
        "model_type",
    ):
        assert (field, "missing") in refused and (field, "string") in refused, field
    assert not (tmp_path / "out").exists()
    print(f"{family}: {len(outcomes)} config edits, {len(refused)} refused, {len(outcomes) - len(refused)} accepted")


def test_config_that_is_not_an_object_or_not_json(tiny_model, tmp_path):
    from converters.convert import hf_to_maxtext

    src = tmp_path / "src"
    shutil.copytree(tiny_model("llama3.1"), src)
    for text, match in [("[1, 2]", "must be a JSON object"), ("{oops", "not valid JSON"), ("\xff", "not valid JSON")]:
        (src / "config.json").write_text(text, errors="surrogateescape") if text != "\xff" else (
            src / "config.json"
        ).write_bytes(b"\xff")
        with pytest.raises(CkptflowError, match=match):
            hf_to_maxtext(src, tmp_path / "out")


# ------------------------------------------------------------------------------------------ NaN and Inf


@pytest.fixture(scope="module")
def poisoned(tiny_model, tmp_path_factory):
    """A tiny Llama with NaN in one layer's down_proj and Inf in the final norm, and its MaxText conversion."""
    from converters.convert import hf_to_maxtext

    root = tmp_path_factory.mktemp("poisoned")
    src = root / "hf"
    shutil.copytree(tiny_model("llama3.1", dtype="float32"), src)
    f = SafetensorsFolder(src)
    tensors = {n: f.read(n).copy() for n in f.tensors}
    tensors["model.layers.1.mlp.down_proj.weight"][3, :5] = np.nan
    tensors["model.norm.weight"][7] = np.inf
    (src / "model.safetensors").unlink()
    save_file(src / "model.safetensors", tensors)
    hf_to_maxtext(src, root / "mt", dtype="float32")
    return src, root / "mt"


def test_verify_names_nonfinite_weights_on_both_sides(poisoned, tmp_path, capsys):
    from converters.cli.main import main

    hf, mt = poisoned
    code = main(["verify", "--hf", str(hf), "--maxtext", str(mt), "--report", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1  # verification failed, not a crash
    report = json.loads((tmp_path / "r" / "verify.json").read_text())
    found = report["summary"]["nonfinite_weights"]
    assert found["hf"] == {
        "model.layers.1.mlp.down_proj.weight": {"nan": 5, "inf": 0},
        "model.norm.weight": {"nan": 0, "inf": 1},
    }
    assert found["maxtext"] == {
        "decoder/layers/mlp/wo/kernel": {"nan": 5, "inf": 0},
        "decoder/decoder_norm/scale": {"nan": 0, "inf": 1},
    }
    assert report["passed"] is False
    assert "non-finite weights in the HF model: model.layers.1.mlp.down_proj.weight (5 NaN, 0 Inf)" in err
    assert "decoder/decoder_norm/scale (0 NaN, 1 Inf)" in err
    assert "non-finite weights" in (tmp_path / "r" / "verify.md").read_text()


# -------------------------------------------------------------------------------------- damaged Orbax


@pytest.fixture
def orbax_copy(tiny_model, tmp_path):
    from converters.convert import hf_to_maxtext

    hf_to_maxtext(tiny_model("qwen3"), tmp_path / "mt")
    return tmp_path / "mt"


@pytest.mark.parametrize(
    "damage, match",
    [
        ("delete_data_file", "cannot (open|read) array"),
        ("truncate_data_file", "cannot (open|read) array"),
        ("garbage_metadata", "unreadable Orbax tree metadata"),
        ("metadata_not_a_tree", "unreadable Orbax tree metadata"),
        ("delete_ocdbt_manifest", "cannot (open|read) array"),
    ],
)
def test_damaged_orbax_storage_is_a_clear_error(orbax_copy, tmp_path, damage, match):
    from converters.convert import maxtext_to_hf

    items = orbax_copy / "0" / "items"
    data = sorted((items / "ocdbt.process_0" / "d").iterdir(), key=lambda p: -p.stat().st_size)
    if damage == "delete_data_file":
        data[0].unlink()
    elif damage == "truncate_data_file":
        data[0].write_bytes(data[0].read_bytes()[: data[0].stat().st_size // 2])
    elif damage == "garbage_metadata":
        (items / "_METADATA").write_text("{not json")
    elif damage == "metadata_not_a_tree":
        (items / "_METADATA").write_text("[]")
    elif damage == "delete_ocdbt_manifest":
        (items / "ocdbt.process_0" / "manifest.ocdbt").unlink()
        (items / "manifest.ocdbt").unlink()
    with pytest.raises(CkptflowError, match=match) as e:
        maxtext_to_hf(orbax_copy, tmp_path / "hf")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if ".ckptflow-" in p.name]


# ---------------------------------------------------------------------------------- never run their code


def test_pickles_and_python_files_are_never_taken(tmp_path):
    """A hub-style folder with only pickled weights and custom modeling code: download refuses it, naming why;
    with safetensors beside them, neither the pickles nor the code are copied."""
    from converters.cli.commands.download import download

    src = tmp_path / "repo"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling_evil.Evil"}})
    )
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    (src / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(CkptflowError, match="only pickled weights found .*pytorch_model.bin.*never loads pickles"):
        download(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    save_file(src / "model.safetensors", {"w": np.ones(2, np.float32)})
    download(str(src), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "ckptflow-download.json",
        "config.json",
        "model.safetensors",
    ]


def test_remote_code_in_a_model_folder_never_runs(tiny_model, tmp_path):
    """`auto_map` pointing at code in the folder (model and tokenizer): verify's loaders use the built-in classes."""
    from converters.verify.hf_side import HFModel, load_tokenizer, read_config

    src = tmp_path / "hf"
    shutil.copytree(tiny_model("llama3.1"), src)
    marker = tmp_path / "remote-code-ran"
    evil = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (src / "modeling_evil.py").write_text(evil + "class Evil: pass\n")
    (src / "tokenization_evil.py").write_text(evil + "class EvilTok: pass\n")
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil", "AutoConfig": "modeling_evil.Evil"}
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTok", None]}})
    )
    try:
        HFModel(read_config(src))  # transformers' built-in class of the config's model_type, never auto_map's
    except CkptflowError:
        pass  # refusing is fine too; running the code is not
    load_tokenizer(src)
    assert not marker.exists()


def test_no_code_path_enables_remote_code_or_unpickling():
    """A guard on the sources: no `trust_remote_code=True`, no pickle/torch.load of checkpoint files."""
    import re

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for py in [*root.glob("converters/**/*.py"), *root.glob("operators/**/*.py"), *root.glob("dags/**/*.py")]:
        text = py.read_text()
        for pattern in (
            r"trust_remote_code\s*=\s*True",
            r"\bpickle\.loads?\(",
            r"torch\.load\(",
            r"weights_only\s*=\s*False",
        ):
            if re.search(pattern, text):
                offenders.append(f"{py.relative_to(root)}: {pattern}")
    assert offenders == []

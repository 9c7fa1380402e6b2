"""The `ckptflow` CLI: exit codes, one-line errors, JSON output, help that teaches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from converters.cli.main import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converters", *args], capture_output=True, text=True)


def test_models_json_lists_every_family():
    p = run("models", "--json")
    assert p.returncode == 0
    rows = json.loads(p.stdout)
    names = {r["model"] for r in rows}
    assert {"llama3.1-8b", "llama3.1-405b", "mistral-7b", "qwen2.5-7b", "qwen3-0.6b", "qwen3-32b"} <= names
    from converters.core import registry

    assert {r["family"] for r in rows} == set(registry.FAMILIES) and names == set(registry.model_names())
    # all four directions, or the two unscanned ones for a block MaxText builds only unscanned (Gemma 4 small)
    assert all(len(r["directions"]) == (4 if registry.family(r["family"]).scannable else 2) for r in rows)
    assert {r["model"] for r in rows if len(r["directions"]) == 2} == {"gemma4-e2b", "gemma4-e4b"}
    # the published checkpoint's own model_type / class, not the family's first
    by = {r["model"]: r for r in rows}
    assert by["kimi-k2-1t"]["hf_model_type"] == "kimi_k2"
    assert by["llama4-17b-16e"]["architecture"] == "Llama4ForConditionalGeneration"
    table = {line.split()[0]: line for line in run("models").stdout.splitlines()[1:] if line.strip()}
    assert table["gemma4-e2b"].endswith("unscanned only") and table["llama3.1-8b"].endswith("scanned and unscanned")


def test_convert_round_trip_and_inspect(tiny_model, tmp_path, capsys):
    src = tiny_model("qwen3")
    assert main(["convert", str(src), str(tmp_path / "mt"), "--to", "maxtext", "--no-scan", "-q"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "mt")
    assert main(["inspect", str(tmp_path / "mt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "maxtext-orbax" and info["scan_layers"] is False
    assert info["arrays"]["decoder/layers_1/self_attention/query/kernel"]["shape"] == [64, 4, 32]
    assert info["manifest"]["family"] == "qwen3"
    assert main(["convert", str(tmp_path / "mt"), str(tmp_path / "hf"), "--to", "hf", "-q"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "hf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "hf-safetensors" and info["model_type"] == "qwen3"
    assert "model.layers.1.self_attn.q_norm.weight" in info["arrays"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["convert", "{missing}", "{out}", "--to", "maxtext"], "not a directory"),
        (["convert", "{src}", "{out}", "--to", "hf"], "not an Orbax checkpoint"),
        (["convert", "{src}", "{out}", "--to", "maxtext", "--model", "gpt-5"], None),
        (["inspect", "{missing}"], "no such checkpoint"),
    ],
)
def test_errors_are_one_line_with_nonzero_exit(tiny_model, tmp_path, args, message):
    src = tiny_model("llama3.1")
    args = [a.format(src=src, out=tmp_path / "out", missing=tmp_path / "missing") for a in args]
    p = run(*args)
    if message is None:  # --model is only a fallback when SRC has no config.json: converts fine
        assert p.returncode == 0, p.stderr
        return
    assert p.returncode == 2
    err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and message in err[0] and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_bad_arguments_exit_2_with_usage():
    p = run("convert", "a", "b", "--to", "onnx")
    assert p.returncode == 2 and "invalid choice" in p.stderr


def test_help_teaches_with_examples():
    p = run("convert", "--help")
    assert p.returncode == 0
    for word in ("examples:", "--scan", "--dtype", "--pathways", "load_parameters_path", "--overwrite"):
        assert word in p.stdout

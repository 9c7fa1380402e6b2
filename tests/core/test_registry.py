"""The one family registry: every family has its reference and test models; configs of other heads are refused."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys

import pytest

from converters.core import registry
from converters.errors import UnsupportedModelError


def test_every_family_declares_a_reference_forward():
    from converters.verify.reference import forward_of
    from converters.verify.reference.common import Forward

    for f in registry.FAMILIES.values():
        assert isinstance(forward_of(f), Forward), f.name


def test_every_reference_forward_belongs_to_a_family():
    import converters.verify.reference as ref_pkg
    from converters.verify.reference.common import Forward

    declared = {f.reference for f in registry.FAMILIES.values()}
    defined = set()
    for m in pkgutil.iter_modules(ref_pkg.__path__):
        mod = importlib.import_module(f"{ref_pkg.__name__}.{m.name}")
        for name, obj in vars(mod).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, Forward)
                and obj.__module__ == mod.__name__
                and not name.startswith("_")
            ):
                defined.add(f"{mod.__name__}:{name}")
    defined = {d for d in defined if not d.startswith("converters.verify.reference.common:")}  # the base classes
    # the base of a declared reference (Gemma4Forward under Gemma4MultimodalForward) needs no family of its own
    classes = [getattr(importlib.import_module(r.partition(":")[0]), r.partition(":")[2]) for r in declared]
    bases = {f"{b.__module__}:{b.__name__}" for c in classes for b in c.__mro__[1:]}
    assert defined - declared - bases == set(), "reference forward classes no family names in Family.reference"
    assert declared <= defined


def test_every_family_has_test_models_of_its_own_models():
    seen: dict[str, str] = {}
    for f in registry.FAMILIES.values():
        assert f.test_models, f"{f.name}: declare test_models"
        for name, (base, dims) in f.test_models.items():
            assert name not in seen, f"test model {name} declared by {seen.get(name)} and {f.name}"
            seen[name] = f.name
            assert base in f.models, f"{f.name}: test model {name} shrinks {base}, not one of its models"
            assert isinstance(dims, dict) and dims


def test_model_names_are_unique_and_shared_model_types_route_by_config():
    """Families may share a model_type (gemma4_text: the dense/MoE block and the small one with per-layer inputs) only
    when `Family.accepts` tells their configs apart: exactly one of them accepts each of their published configs."""
    names = registry.model_names()
    assert len(names) == len(set(names))
    by_type: dict[str, list] = {}
    for f in registry.FAMILIES.values():
        for t in f.model_types:
            by_type.setdefault(t, []).append(f)
    shared = {t: fs for t, fs in by_type.items() if len(fs) > 1}
    assert "gemma4_text" in shared
    for fs in shared.values():
        for f in fs:
            for name, cfg in f.models.items():
                assert [g for g in fs if g.accepts(cfg)] == [f], name
                assert registry.family_for_config(cfg) is f, name


def test_gemma4_text_routes_by_per_layer_inputs_and_kv_sharing():
    dense = registry.model("gemma4-31b")[1]
    assert registry.family_for_config(dense).name == "gemma4"
    for change in ({"hidden_size_per_layer_input": 256}, {"num_kv_shared_layers": 6}):
        assert registry.family_for_config({**dense, **change}).name == "gemma4-small"
    absent = {k: v for k, v in dense.items() if k != "hidden_size_per_layer_input"}  # transformers' default: 256
    assert registry.family_for_config(absent).name == "gemma4-small"
    assert registry.family_for_config(registry.model("gemma4-e2b")[1]).name == "gemma4-small"
    # unscanned only: `ckptflow models` lists the two unscanned directions
    rows = {r["model"]: r["directions"] for r in registry.table()}
    assert rows["gemma4-e2b"] == ["hf->maxtext (unscanned)", "maxtext->hf (unscanned)"]
    assert len(rows["gemma4-31b"]) == 4
    # without a config: the first family of the model type; every family accepts by default
    assert registry.family_for_model_type("gemma4_text").name == "gemma4"
    assert registry.family("llama3.1").accepts({})


@pytest.mark.parametrize(
    "arch", ["Qwen3ForSequenceClassification", "Qwen3ForTokenClassification", "Qwen3ForQuestionAnswering"]
)
def test_other_heads_are_refused_with_the_reason(arch):
    cfg = registry.model("qwen3-0.6b")[1]
    assert registry.family_for_config(cfg).name == "qwen3"
    with pytest.raises(UnsupportedModelError, match=f"{arch}.*Qwen3ForCausalLM.*language model"):
        registry.family_for_config({**cfg, "architectures": [arch]})


def test_configs_without_architectures_still_resolve():
    cfg = {k: v for k, v in registry.model("llama3.1-8b")[1].items() if k != "architectures"}
    assert registry.family_for_config(cfg).name == "llama3.1"
    gemma = registry.model("gemma3-4b")[1]
    assert gemma["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert registry.family_for_config({**gemma, "architectures": ["Gemma3ForCausalLM"]}).name == "gemma3"


def test_cli_refuses_a_classifier_in_one_line(tiny_model, tmp_path):
    import shutil

    src = tmp_path / "clf"
    shutil.copytree(tiny_model("qwen3"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["Qwen3ForSequenceClassification"]
    (src / "config.json").write_text(json.dumps(cfg))
    p = subprocess.run(
        [sys.executable, "-m", "converters", "convert", str(src), str(tmp_path / "out"), "--to", "maxtext"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Qwen3ForSequenceClassification" in lines[0], p.stderr
    assert not (tmp_path / "out").exists()

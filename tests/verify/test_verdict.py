"""The three-part verdict: what content, layout and precision each catch, and what a correct conversion passes.

Every broken case runs on 4-token prompts: content compares tensors, and the layout check compares the two models
on the same values in float32, so neither needs a long prompt to see a mistake.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.core.transforms import RopeInterleave, Scale, Transform
from converters.families.llama import Llama31
from converters.io.safetensors import SafetensorsFolder, save_file
from converters.tiny_models import make_test_model
from converters.verify import verify

SHORT = '{"tokens": [1, 17, 301, 44]}\n{"tokens": [9, 2, 250, 3]}\n'


@pytest.fixture
def short(tmp_path):
    f = tmp_path / "short.jsonl"
    f.write_text(SHORT)
    return f


def _failed(r) -> set[str]:
    return {f["tensor"] for f in r.data["verdict"]["content"]["failures"]}


# (family, damage of tests/verify/conftest.py, tensors content must name)
DAMAGED = [
    (
        "llama3.1",
        "skip_rope_permutation",
        {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"},
    ),
    (
        "llama3.1",
        "skip_query_scaling",
        {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"},
    ),
    ("llama3.1", "swap_layers", {"model.layers.0.mlp.up_proj.weight", "model.layers.1.input_layernorm.weight"}),
    ("qwen2.5", "transpose_square_query_kernel", {"model.layers.0.self_attn.q_proj.weight"}),
    ("qwen3", "wrong_rope_permutation", {"model.layers.1.self_attn.k_proj.weight"}),
    ("qwen3", "swap_gate_and_up", {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"}),
]


@pytest.mark.parametrize("family,damage,named", DAMAGED, ids=[f"{f}-{d}" for f, d, _ in DAMAGED])
def test_a_damaged_checkpoint_fails_content_by_name(damaged, short, family, damage, named):
    hf, broken = damaged(family, damage, True)
    r = verify(maxtext=broken, hf=hf, prompts_file=short)
    assert not r.passed and not r.data["verdict"]["content"]["passed"]
    assert named <= _failed(r), _failed(r)
    assert r.data["summary"]["content_passed"] is False


def test_an_edited_source_tensor_is_named(converted, short, tmp_path):
    hf, ckpt = converted("qwen3", True)
    edited = tmp_path / "hf"
    shutil.copytree(hf, edited)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = {n: SafetensorsFolder(edited).read(n).copy() for n in SafetensorsFolder(edited).tensors}
    tensors[name][3, 5] = tensors[name][3, 5] * 2 + 0.5
    for f in edited.glob("*.safetensors"):
        f.unlink()
    save_file(edited / "model.safetensors", tensors)
    r = verify(maxtext=ckpt, hf=edited, prompts_file=short)
    assert not r.passed
    c = r.data["verdict"]["content"]
    assert _failed(r) == {name} and c["failures"][0]["elements_outside_bound"] == 1
    assert c["failures"][0]["example"]["index"] == [3, 5]
    assert r.data["verdict"]["layout"]["passed"]  # the checkpoint itself is a faithful MaxText model of what it holds


def test_a_different_source_model_fails_content(converted, short, tmp_path):
    _, ckpt = converted("llama3.1", True)
    other = make_test_model("llama3.1", tmp_path / "other", seed=7)
    r = verify(maxtext=ckpt, hf=other, prompts_file=short)
    c = r.data["verdict"]["content"]
    assert not r.passed and c["failed"] == c["tensors"]  # every tensor, each by name
    assert r.data["verdict"]["layout"]["passed"]


def test_a_swapped_expert_is_named(short, tmp_path):
    from tests.verify.helpers import restore_tree, save_tree

    hf = make_test_model("qwen3-moe", tmp_path / "hf")
    good = tmp_path / "good"
    hf_to_maxtext(hf, good, scan=False)
    tree = restore_tree(good)
    moe = tree["params"]["params"]["decoder"]["layers_1"]["moe_block"]
    moe["wo"] = np.array(moe["wo"])[[1, 0, 2, 3]]
    bad = save_tree(tree, good, tmp_path / "bad")
    r = verify(maxtext=bad, hf=hf, prompts_file=short)
    assert _failed(r) == {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in (0, 1)}
    assert r.data["verdict"]["layout"]["passed"]


class _TransposeSquare(Transform):
    """A query kernel transposed the wrong way in both directions (square projections only)."""

    def forward(self, x):
        e = x.shape[0]
        return np.ascontiguousarray(x.reshape(e, e).T).reshape(x.shape)

    inverse = forward


def _wrong_both_ways(kind: str):
    """Llama's rules with one mistake that the inverse undoes: content cannot see it, layout must."""
    rules = Llama31.layer_rules

    def layer_rules(d):
        out = []
        for r in rules.__func__(Llama31, d):
            chain = r.chain
            if kind == "rope_layout" and r.hf.endswith(("q_proj.weight", "k_proj.weight")):
                chain = tuple(t for t in chain if not isinstance(t, RopeInterleave))
            elif kind == "query_scale" and r.hf.endswith("q_proj.weight"):
                chain = tuple(Scale(1.0 / d.head_dim) if isinstance(t, Scale) else t for t in chain)
            elif kind == "transposed_query" and r.hf.endswith("q_proj.weight"):
                chain = (*chain[:1], _TransposeSquare(), *chain[1:])
            elif kind == "gate_for_up" and r.hf.endswith(("gate_proj.weight", "up_proj.weight")):
                r = dataclasses.replace(r, mt="mlp/wi_1/kernel" if "gate" in r.hf else "mlp/wi_0/kernel")
            out.append(dataclasses.replace(r, chain=chain) if chain is not r.chain else r)
        return out

    return classmethod(lambda cls, d: layer_rules(d))


@pytest.mark.parametrize("kind", ["rope_layout", "query_scale", "transposed_query", "gate_for_up"])
def test_a_mapping_wrong_both_ways_fails_layout(kind, short, tmp_path, monkeypatch):
    overrides = {"num_attention_heads": 2, "head_dim": 32} if kind == "transposed_query" else {}  # a square query
    hf = make_test_model("llama3.1", tmp_path / "hf", dtype="float32")
    if overrides:
        cfg = json.loads((hf / "config.json").read_text())
        hf = _llama_with(tmp_path / "hf2", {**cfg, **overrides})
    monkeypatch.setattr(Llama31, "layer_rules", _wrong_both_ways(kind))
    ckpt = tmp_path / "mt"
    hf_to_maxtext(hf, ckpt, scan=True, dtype="float32")
    r = verify(maxtext=ckpt, hf=hf, prompts_file=short)
    v = r.data["verdict"]
    assert v["content"]["passed"], v["content"]["failures"]  # the inverse undid the mistake
    assert not v["layout"]["passed"] and v["layout"]["kl_max"] > 100 * v["layout"]["max_kl"], v["layout"]
    assert not r.passed


def _llama_with(out, cfg):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "dtype", "transformers_version")}
    model_type = cfg.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg), dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape) if "norm" in n else 0.08 * torch.randn(p.shape))
    model.save_pretrained(out)
    return out


def test_sharp_attention_bf16_llama_passes_content_and_layout(tmp_path):
    """Large q/k weights make attention sharp, so the bf16 rounding of the scaled query moves the logits a lot: the
    precision part shows (and judges) that cost, content and layout still pass."""
    import torch
    from transformers import AutoModelForCausalLM

    src = make_test_model("llama3.1", tmp_path / "src", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(12.0)
    model.save_pretrained(tmp_path / "sharp")
    hf = tmp_path / "sharp"
    hf_to_maxtext(hf, tmp_path / "mt", scan=True, dtype="bfloat16")
    r = verify(maxtext=tmp_path / "mt", hf=hf)
    v = r.data["verdict"]
    assert v["content"]["passed"] and v["content"]["within_bound"] == 2  # the two query kernels, <= 1 ulp
    fmt = r.data["comparisons"]["format"]["summary"]["kl_max"]
    print("sharp llama: layout", v["layout"]["kl_max"], "format", fmt, "precision", v["precision"]["kl_max"])
    # sharp attention amplifies float32 accumulation noise too (measured 2e-7), far below what the format costs
    assert v["layout"]["passed"] and v["layout"]["kl_max"] < fmt / 1000
    assert fmt > 1e-3  # the format's rounding is real on this model ...
    assert v["precision"]["kl_max"] == pytest.approx(fmt, rel=0.05)  # ... and is what the precision number is made of
    assert any("query/kernel" in line for line in v["precision"]["explanation"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bf16_gemma3_passes_content_and_layout(tmp_path, dtype):
    """bf16 Gemma3: norms stored as 1 + w and the embedding times bf16(sqrt(hidden)) lose information, which the
    precision part reports; content (within the format's bound) and layout (the same values on both sides, with
    the embedding scale MaxText computes with) pass in either compute dtype."""
    hf = make_test_model("gemma3", tmp_path / "hf")
    hf_to_maxtext(hf, tmp_path / "mt", scan=False, dtype="bfloat16")
    r = verify(maxtext=tmp_path / "mt", hf=hf, dtype=dtype)
    v = r.data["verdict"]
    assert v["content"]["passed"] and v["content"]["within_bound"] > 0
    assert v["layout"]["passed"] and v["layout"]["kl_max"] < 1e-9
    assert any("sqrt" in line or "x * " in line for line in v["precision"]["explanation"])
    if dtype == "bfloat16":
        assert "bf16_compute" in r.data["comparisons"] and "hf_bf16" in r.data["comparisons"]

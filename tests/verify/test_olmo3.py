"""OLMo 3 reference forward (post-norms, q/k RMSNorm over all heads, 3 sliding + 1 full layers, RoPE per layer type)
and verification.

1. The JAX reference against transformers on weights laid out by numpy (not the converter), float32, 300 tokens:
   KL < 1e-9 for the YaRN model and the plain-RoPE one, scanned and unscanned; the window and each layer type's RoPE
   are really exercised (leaving either out no longer matches), and with YaRN given to both layer types (what
   MaxText's olmo3 block computes) the reference matches transformers run with that config.
2. Converted checkpoints verify on the default prompts incl. the ~500-token one, in float32 and bfloat16 compute: the
   YaRN model with the warning that MaxText applies YaRN to the sliding-window layers too, the plain one with none.
3. One wrong mapping per transform the family has, each undone by its own inverse (so content passes): verify's
   layout check fails every one on two 4-token prompts by more than 100x its threshold.
4. Damaged checkpoints fail content, by name.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters.convert import hf_to_maxtext
from converters.core.mapping import LayerGroup
from converters.core.transforms import Kernel, Permute, RopeInterleave, Scale, Transform
from converters.errors import UnsupportedModelError
from converters.families.olmo3 import Olmo3
from converters.verify import verify
from converters.verify.metrics import kl_per_token
from converters.verify.reference import ReferenceModel
from tests.families.helpers import attention_kernels, mlp_kernels, qk_norms
from tests.verify.helpers import (
    SHORT,
    assert_fails_layout_only,
    assert_reference_matches_transformers,
    embed_and_head,
    hf_float32,
    hf_logits,
    restore_tree,
    save_tree,
    variants_cache,
)

LAYERS, P = 8, 4
EXACT_KL = 1e-9


def to_maxtext(folder: Path, scan: bool) -> dict:
    """HF safetensors -> MaxText arrays with numpy, independently of the converter (src/maxtext/models/olmo3.py names;
    scanned: HF layer i is entry i // 4 of `decoder/layers/layers_<i % 4>`)."""
    cfg, hf = hf_float32(folder)
    e, n, k, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        layers.append(
            {
                **attention_kernels(hf, a, e, n, k, d, module="attention"),
                **qk_norms(hf, a, module="attention"),
                "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
                **mlp_kernels(hf, p + "mlp."),
                "post_mlp_layer_norm/scale": hf[p + "post_feedforward_layernorm.weight"],
            }
        )
    out = embed_and_head(hf)
    if not scan:
        return out | {f"decoder/layers_{i}/{key}": v for i, lay in enumerate(layers) for key, v in lay.items()}
    for b in range(P):
        group = layers[b::P]
        out |= {f"decoder/layers/layers_{b}/{key}": np.stack([lay[key] for lay in group], axis=1) for key in group[0]}
    return out


def with_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of HF folder `src` whose config.json has `changes`."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


@pytest.mark.parametrize("family", ["olmo3", "olmo3-pt"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_reference_matches_transformers(tiny_model, family, scan):
    src = tiny_model(family, layers=LAYERS, dtype="float32")
    assert_reference_matches_transformers(src, to_maxtext(src, scan), EXACT_KL)


def test_the_window_and_each_layer_types_rope_are_applied(tiny_model, tmp_path):
    """On 300 tokens: without the 16-token window the reference matches HF only within it; with YaRN on the sliding
    layers too (MaxText's olmo3 block) it no longer matches HF, but matches transformers given that same config."""
    src = tiny_model("olmo3", layers=LAYERS, dtype="float32")
    cfg = json.loads((src / "config.json").read_text())
    params = to_maxtext(src, True)
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=300)]
    want = hf_logits(src, ids)
    no_window = kl_per_token(want, ReferenceModel(params, {**cfg, "sliding_window": 1024}).logits(ids))
    assert no_window[:16].max() < EXACT_KL and no_window.max() > 1e-3
    yarn = cfg["rope_parameters"]["full_attention"]
    everywhere = {"full_attention": yarn, "sliding_attention": yarn}
    as_maxtext = kl_per_token(want, ReferenceModel(params, {**cfg, "rope_parameters": everywhere}).logits(ids))
    assert as_maxtext[0] < EXACT_KL and as_maxtext[1:].mean() > 1e-3  # position 0 attends to itself only
    assert_reference_matches_transformers(
        with_config(src, tmp_path / "yarn", rope_parameters=everywhere), params, EXACT_KL
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`converted(family, scan)` -> (HF folder, bf16 checkpoint) of the 8-layer tiny model, built once each."""
    return variants_cache(tmp_path_factory, LAYERS)


@pytest.mark.parametrize("family", ["olmo3", "olmo3-pt"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_checkpoint_verifies(converted, family, scan):
    hf, ckpt = converted(family, scan)
    r = verify(maxtext=ckpt, hf=hf)
    v = r.data["verdict"]
    assert r.passed, v
    assert r.data["prompts"][-1]["name"] == "long" and r.data["prompts"][-1]["num_tokens"] >= 400
    assert v["content"]["passed"] and v["content"]["within_bound"] == 0  # every tensor exact: nothing is scaled
    assert v["layout"]["kl_max"] < EXACT_KL
    if family == "olmo3":
        assert len(r.data["warnings"]) == 1 and "MaxText's olmo3 block gives every layer" in r.data["warnings"][0]
    else:
        assert r.data["warnings"] == []


@pytest.mark.parametrize("family", ["olmo3", "olmo3-pt"])
def test_bfloat16_compute_verifies(converted, family):
    hf, ckpt = converted(family, True)
    r = verify(maxtext=ckpt, hf=hf, dtype="bfloat16")
    v = r.data["verdict"]
    assert r.passed and v["content"]["passed"] and v["layout"]["passed"] and v["precision"]["passed"], v


class _TransposeSquare(Transform):
    """A square [E, E] kernel transposed the wrong way in both directions."""

    def forward(self, x):
        e = x.shape[0]
        return np.ascontiguousarray(x.reshape(e, e).T).reshape(x.shape)

    inverse = forward


@dataclasses.dataclass(repr=False)
class _HeadsMajorToDimMajor(Transform):
    """A `[heads * head_dim]` norm scale read as `[head_dim, heads]` (both directions)."""

    heads: int

    def forward(self, x):
        return np.ascontiguousarray(x.reshape(self.heads, -1).T).reshape(-1)

    def inverse(self, y):
        return np.ascontiguousarray(y.reshape(-1, self.heads).T).reshape(-1)


def _wrong(kind: str):
    """Olmo3's rules with one mistake per kind of transform the family has, undone by its inverse."""
    rules = Olmo3.layer_rules

    def layer_rules(d):
        out = []
        for r in rules.__func__(Olmo3, d):
            chain, mt = r.chain, r.mt
            if kind == "rope_interleaved" and r.hf.endswith(("q_proj.weight", "k_proj.weight")):  # Llama 3.1's layout
                chain = (*chain, RopeInterleave())
            elif kind == "query_scale_baked" and r.hf.endswith("q_norm.weight"):
                # Mistral's 1/sqrt(head_dim), though MaxText scales olmo3's query at run time. Baked into the query
                # kernel it would be normalized away by the q norm that follows (all but its eps); into the q norm's
                # scale it is applied twice
                chain = (Scale(d.head_dim**-0.5),)
            elif kind == "query_transposed" and r.hf.endswith("q_proj.weight"):
                chain = (*chain[:1], _TransposeSquare())
            elif kind == "out_heads_and_dims_swapped" and r.hf.endswith("o_proj.weight"):
                chain = (Kernel((d.head_dim, d.heads, d.emb), n_in=2), Permute((1, 0, 2)))
            elif kind == "qk_norm_per_dim_order" and r.hf.endswith(("q_norm.weight", "k_norm.weight")):
                chain = (_HeadsMajorToDimMajor(d.heads if "q_norm" in r.hf else d.kv_heads),)
            elif kind == "post_norms_swapped" and r.hf.endswith("layernorm.weight"):
                mt = "post_mlp_layer_norm/scale" if "post_attention" in r.hf else "post_self_attention_layer_norm/scale"
            elif kind == "gate_for_up" and r.hf.endswith(("gate_proj.weight", "up_proj.weight")):
                mt = "mlp/wi_1/kernel" if "gate" in r.hf else "mlp/wi_0/kernel"
            out.append(dataclasses.replace(r, chain=chain, mt=mt) if (chain, mt) != (r.chain, r.mt) else r)
        return out

    return classmethod(lambda cls, d: layer_rules(d))


def _contiguous_stacks(cls, d, scan):
    """Scanned stacks of consecutive layers (0, 1 | 2, 3 | ...), not MaxText's every fourth (0, 4 | 1, 5 | ...)."""
    n, rules = d.layers, tuple(cls.layer_rules(d))
    return [
        LayerGroup(rules, tuple(range(b * n // P, (b + 1) * n // P)), f"decoder/layers/layers_{b}", ())
        for b in range(P)
    ]


WRONG = [
    "rope_interleaved",
    "query_scale_baked",
    "query_transposed",
    "out_heads_and_dims_swapped",
    "qk_norm_per_dim_order",
    "post_norms_swapped",
    "gate_for_up",
    "layer_stacks",
]


@pytest.mark.parametrize("kind", WRONG)
def test_a_mapping_wrong_both_ways_fails_layout(kind, tiny_model, tmp_path, monkeypatch):
    src = tiny_model("olmo3", layers=LAYERS, dtype="float32")
    if kind == "query_transposed":  # a square query projection: 2 heads x 32 = hidden 64
        src = _olmo3_with(tmp_path / "square", json.loads((src / "config.json").read_text()), num_attention_heads=2)
    if kind == "layer_stacks":
        monkeypatch.setattr(Olmo3, "layer_groups", classmethod(_contiguous_stacks))
    else:
        monkeypatch.setattr(Olmo3, "layer_rules", _wrong(kind))
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    assert_fails_layout_only(tmp_path / "mt", src, tmp_path, kind)


def _olmo3_with(out: Path, cfg: dict, **changes) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {
        k: v
        for k, v in {**cfg, **changes}.items()
        if k not in ("architectures", "torch_dtype", "dtype", "transformers_version")
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape) if "norm" in n else 0.08 * torch.randn(p.shape))
    model.save_pretrained(out)
    return out


def test_damaged_checkpoints_fail_content_by_name(converted, tmp_path):
    """A q_norm scale doubled in HF layer 5, and the two entries of stack layers_1 (HF layers 1 and 5) exchanged."""
    hf, good = converted("olmo3", True)
    (tmp_path / "short.jsonl").write_text(SHORT)
    tree = restore_tree(good)
    qn = tree["params"]["params"]["decoder"]["layers"]["layers_1"]["attention"]["query_norm"]
    qn["scale"] = np.array(qn["scale"])
    qn["scale"][:, 1] = qn["scale"][:, 1].astype(np.float32) * 2
    r = verify(maxtext=save_tree(tree, good, tmp_path / "norm"), hf=hf, prompts_file=tmp_path / "short.jsonl")
    assert not r.passed and {f["tensor"] for f in r.data["verdict"]["content"]["failures"]} == {
        "model.layers.5.self_attn.q_norm.weight"
    }

    tree = restore_tree(good)
    stack = tree["params"]["params"]["decoder"]["layers"]["layers_1"]

    def swap(node):
        for k, v in node.items():
            node[k] = swap(v) if isinstance(v, dict) else np.array(v)[:, ::-1]
        return node

    swap(stack)
    r = verify(maxtext=save_tree(tree, good, tmp_path / "swapped"), hf=hf, prompts_file=tmp_path / "short.jsonl")
    failed = {f["tensor"] for f in r.data["verdict"]["content"]["failures"]}
    assert (
        not r.passed
        and {
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.5.self_attn.k_norm.weight",
            "model.layers.5.post_feedforward_layernorm.weight",
        }
        <= failed
    )
    assert not any(".layers.0." in t or ".layers.4." in t for t in failed)


def test_configs_the_reference_refuses(tiny_model):
    from converters.verify.reference.common import hf_config_object
    from converters.verify.reference.olmo3 import Olmo3Forward

    cfg = json.loads((tiny_model("olmo3", layers=LAYERS) / "config.json").read_text())
    fwd = Olmo3Forward()
    fwd.make_spec(hf_config_object(cfg))
    yarn = cfg["rope_parameters"]["full_attention"]
    for changes, reason in (
        ({"layer_types": ["full_attention"] * LAYERS}, "layer_types"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        (
            {"rope_parameters": {**cfg["rope_parameters"], "full_attention": {**yarn, "attention_factor": 1.5}}},
            "attention_factor",
        ),
        (
            {
                "rope_parameters": {
                    **cfg["rope_parameters"],
                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
                }
            },
            "rope_type='linear'",
        ),
    ):
        with pytest.raises(UnsupportedModelError, match=reason):
            fwd.make_spec(hf_config_object({**cfg, **changes}))

"""Gemma 4's vision tower reference (converters/verify/reference/gemma4_vision.py) against transformers'
`Gemma4VisionModel` + `Gemma4MultimodalEmbedder` (`Gemma4Model.get_image_features`), float32, on a tiny random tower
(hidden 32, 2 heads x 16, MLP 48, 2 layers, 4px patches, 16 positions, 2 x 2 pooling: gemma4_vision.TINY_VISION).

1. The reference's patchify is transformers' image processor's (`convert_image_to_patches`, channels-first input).
2. On arrays laid out by the tower's rules (converters/families/gemma4_vision.py), the reference reproduces
   transformers' soft tokens to float32 noise: bound 1e-5 relative to the largest value (measured 8.4e-7 on values up to
   3.6: the same operations, summed in another order). Wrong mappings move it to 0.8 .. 1.3.
3. One wrong mapping per transform of the tower (the patch projection transposed, the position table's x/y rows
   swapped, an attention kernel's heads swapped, the output kernel's in/out reshaped the other way, the projector
   transposed, std_bias / std_scale swapped) written to the arrays: the reference differs from transformers by far
   more than the bound -- the test a wrong rule would fail.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from converters.core.transforms import Permute
from converters.families import gemma4_vision as tower
from converters.verify.reference import gemma4_vision as ref

BOUND = 1e-5
EMB = 40  # the text hidden size the projector maps to
ROWS, COLS = 6, 8  # patches: 48, pooled 2 x 2 -> 12 soft tokens


def vision_config():
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    keys = {k: v for k, v in {**tower.VISION_31B, **tower.TINY_VISION}.items() if k not in ("model_type", "dtype")}
    keys.pop("rope_parameters")
    return Gemma4VisionConfig(**keys, rope_parameters={"rope_theta": 100.0, "rope_type": "axial"})


@pytest.fixture(scope="module")
def hf_tower():
    """A tiny random tower + embedder, its HF tensors under the checkpoint's names, an image and HF's soft tokens."""
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder, Gemma4VisionModel

    torch.manual_seed(0)
    cfg = vision_config()
    cfg._attn_implementation = "eager"
    m = Gemma4VisionModel(cfg).float().eval()
    emb = Gemma4MultimodalEmbedder(cfg, Gemma4TextConfig(hidden_size=EMB)).float().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in [*m.named_parameters(), *m.named_buffers(), *emb.named_parameters()]:
            if name.startswith("encoder.rotary_emb"):
                continue
            base = 1.0 if ("norm" in name or name == "std_scale") else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    pixels = ref.test_image(ROWS * 4, COLS * 4) * 0.9 + 0.05 * np.random.default_rng(0).random((ROWS * 4, COLS * 4, 3))
    pixels = pixels.astype(np.float32)
    patches, positions = ref.patchify(pixels, 4)
    with torch.no_grad():
        hidden = m(torch.tensor(patches)[None], torch.tensor(positions)[None]).last_hidden_state
        want = emb(hidden).numpy()
    hf = {"model.vision_tower." + k: v.numpy() for k, v in m.state_dict().items() if "rotary" not in k}
    hf |= {"model.embed_vision." + k: v.numpy() for k, v in emb.state_dict().items()}
    return hf, pixels, want, cfg


def to_maxtext(hf: dict, cfg, wrong: dict | None = None) -> dict:
    """The MaxText arrays of the tower's rules (`wrong`: MaxText path -> a function replacing that array)."""
    from converters.core.mapping import Dims

    v = tower.vision_dims({**tower.VISION_31B, **tower.TINY_VISION})
    d = Dims(emb=EMB, heads=1, kv_heads=1, head_dim=1, mlp=1, vocab=1, layers=0, tied=True, extra={"vision": v})
    out = {r.mt: r.to_maxtext(hf[r.hf], np.dtype(np.float32)) for r in tower.global_rules(d)}
    for group in tower.layer_groups(d):
        for prefix, i in zip(group.unstacked, group.hf_layers):
            for r in group.rules:
                out[f"{prefix}/{r.mt}"] = r.to_maxtext(hf[r.hf.format(i=i)], np.dtype(np.float32))
    for path, f in (wrong or {}).items():
        out[path] = f(out[path])
    assert set(out) == set(ref.global_keys(v["layers"]))
    return out


def spec(cfg) -> tuple:
    return (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.pooling_kernel_size, 100.0, 1e-6)


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_patchify_is_the_image_processors():
    from transformers.models.gemma4.image_processing_pil_gemma4 import convert_image_to_patches

    img = np.random.default_rng(1).random((12, 20, 3)).astype(np.float32)
    patches, positions = ref.patchify(img, 4)
    np.testing.assert_array_equal(patches, convert_image_to_patches(img.transpose(2, 0, 1), 4))
    assert positions[:6].tolist() == [[0, 0], [1, 0], [2, 0], [3, 0], [4, 0], [0, 1]]  # (x, y), row-major


def test_reference_matches_transformers(hf_tower):
    hf, pixels, want, cfg = hf_tower
    got = ref.tokens(spec(cfg), to_maxtext(hf, cfg), pixels, 4)
    assert got.shape == want.shape == (ROWS * COLS // 4, EMB)
    assert rel(got, want) < BOUND, rel(got, want)


E, L0 = tower.ENCODER, tower.ENCODER + "/layer_0/"
WRONG = {
    "patch projection transposed": (
        f"{E}/vision_entry/input_projection/kernel",
        lambda x: x.reshape(-1).reshape(x.shape[::-1]).T.reshape(x.shape),
    ),
    "position table x/y swapped": (f"{E}/vision_entry/pos_emb_param", lambda x: x[:, ::-1]),
    "query heads swapped": (L0 + "attention/query/kernel", lambda x: x[:, ::-1]),
    "out kernel reshaped as [D, N, H]": (
        L0 + "attention/out/kernel",
        lambda x: x.transpose(1, 0, 2).reshape(x.shape),
    ),
    "mlp wo reshaped instead of transposed": (L0 + "mlp/wo/kernel", lambda x: x.T.reshape(x.shape)),
    "projector reshaped instead of transposed": (
        f"{tower.PROJECTOR}/projection/kernel",
        lambda x: x.T.reshape(x.shape),
    ),
    "std_bias / std_scale swapped": (f"{E}/std_bias", None),
}


@pytest.mark.parametrize("what", WRONG)
def test_a_wrong_mapping_is_caught(hf_tower, what):
    hf, pixels, want, cfg = hf_tower
    path, f = WRONG[what]
    if f is None:
        g = to_maxtext(hf, cfg)
        g[f"{E}/std_bias"], g[f"{E}/std_scale"] = g[f"{E}/std_scale"], g[f"{E}/std_bias"]
    else:
        g = to_maxtext(hf, cfg, {path: f})
    assert rel(ref.tokens(spec(cfg), g, pixels, 4), want) > 100 * BOUND


# ---------------------------------------------------------------------------- the whole multimodal model, end to end

LAYERS = 12
EXACT_KL = 1e-8  # float32 noise through the tower and 12 layers: measured 8.5e-10 on the image prompt, 7e-10 on text


@pytest.fixture(scope="module")
def mm_checkpoint(tmp_path_factory):
    """The tiny gemma4-mm model (float32) and its scanned float32 checkpoint."""
    from converters.convert import hf_to_maxtext
    from converters.tiny_models import make_test_model

    root = tmp_path_factory.mktemp("gemma4-mm")
    src = make_test_model("gemma4-mm", root / "hf", layers=LAYERS, dtype="float32")
    hf_to_maxtext(src, root / "mt", scan=True, dtype="float32")
    return src, root / "mt"


@pytest.mark.slow
def test_reference_matches_transformers_with_an_image(mm_checkpoint):
    """The reference on the converted checkpoint vs Gemma4ForConditionalGeneration (eager, float32) on the image
    prompt (tower, projector, soft tokens in place of the image tokens, same-image attention on local layers) and
    on a text prompt without placeholder ids."""
    import json

    from transformers import AutoModelForImageTextToText

    from converters.io.orbax import read_params
    from converters.verify.metrics import kl_per_token
    from converters.verify.reference import ReferenceModel

    src, ckpt = mm_checkpoint
    cfg = json.loads((src / "config.json").read_text())
    model = ReferenceModel(read_params(ckpt), cfg)
    hf = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    ids, inputs = ref.image_prompt(cfg)
    assert sum(inputs["mm_token_type_ids"][0]) == 6 and len(ids) > 8 + 6  # the image run and text past the window
    with torch.no_grad():
        want = hf(torch.tensor([ids]), **{k: torch.from_numpy(v) for k, v in inputs.items()}).logits[0].numpy()
        blind = hf(torch.tensor([ids])).logits[0].numpy()  # no pixels: transformers pads the image tokens
    got = model.logits(ids, inputs)
    assert kl_per_token(want, got).max() < EXACT_KL
    assert kl_per_token(blind, got).max() > 1e-3  # the image matters
    text = [t for t in np.random.default_rng(3).integers(0, 512, size=200).tolist() if t < 505]  # no placeholders
    with torch.no_grad():
        want = hf(torch.tensor([text])).logits[0].numpy()
    assert kl_per_token(want, model.logits(text)).max() < EXACT_KL


@pytest.mark.slow  # ~25 s: the default run has no budget left for it
def test_converted_checkpoint_verifies_with_an_image(mm_checkpoint):
    """`verify` on the multimodal checkpoint: the default prompts (seeded, without the placeholder ids) and the
    generated image prompt pass; layout to float32 noise on every prompt."""
    from converters.verify import verify

    src, ckpt = mm_checkpoint
    r = verify(maxtext=ckpt, hf=src)
    names = [p["name"] for p in r.data["prompts"]]
    assert names == ["short-0", "short-1", "short-2", "long", "image"]
    assert r.passed, r.data["verdict"]
    assert r.data["verdict"]["layout"]["kl_max"] < EXACT_KL


def _wrong_tower(kind: str):
    """The tower's rules with one transform wrong both ways (the inverse undoes it: content passes)."""
    from converters.core.transforms import Kernel, Reshape

    real_globals, real_layer = tower.global_rules, tower.layer_rules

    def fix(r):
        if kind == "patch_reshaped" and r.hf.endswith("input_proj.weight"):
            return dataclasses.replace(r, chain=(Reshape(r.mt_shape, r.hf_shape),))
        if kind == "positions_reshaped" and r.hf.endswith("position_embedding_table"):
            return dataclasses.replace(r, chain=(Reshape(r.mt_shape, r.hf_shape),))
        if kind == "projector_reshaped" and r.hf.endswith("embedding_projection.weight"):
            return dataclasses.replace(r, chain=(Reshape(r.mt_shape, r.hf_shape),))
        if kind == "std_swapped" and r.hf.endswith(("std_bias", "std_scale")):
            return dataclasses.replace(r, mt=r.mt.replace("bias", "X").replace("scale", "bias").replace("X", "scale"))
        if kind == "query_heads_and_dims" and r.hf.endswith("q_proj.linear.weight"):
            h, n, d = r.mt_shape
            return dataclasses.replace(r, chain=(Kernel((h, d, n)), Permute((0, 2, 1))))
        if kind == "attention_norms_swapped" and r.hf.endswith(
            ("input_layernorm.weight", "post_attention_layernorm.weight")
        ):
            return dataclasses.replace(r, mt=("post" if "input" in r.hf else "pre") + "_attention_norm/scale")
        return r

    return (lambda d: [fix(r) for r in real_globals(d)]), (lambda v: [fix(r) for r in real_layer(v)])


TOWER_WRONG = [
    "patch_reshaped",
    "positions_reshaped",
    "projector_reshaped",
    "std_swapped",
    "query_heads_and_dims",
    "attention_norms_swapped",
]


@pytest.mark.slow
@pytest.mark.parametrize("kind", TOWER_WRONG)
def test_a_wrong_tower_mapping_fails_only_the_image_prompt(kind, mm_checkpoint, tmp_path, monkeypatch):
    from converters.convert import hf_to_maxtext
    from converters.verify import verify

    src, _ = mm_checkpoint
    g, layer = _wrong_tower(kind)
    monkeypatch.setattr(tower, "global_rules", g)
    monkeypatch.setattr(tower, "layer_rules", layer)
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    (tmp_path / "short.jsonl").write_text('{"tokens": [1, 17, 301, 44]}\n')
    r = verify(maxtext=tmp_path / "mt", hf=src, prompts_file=tmp_path / "short.jsonl")
    v = r.data["verdict"]
    assert v["content"]["passed"] and v["content"]["failed"] == 0, v["content"]["failures"]  # the inverse undid it
    by_name = {p["name"]: p for p in r.data["prompts"]}
    assert by_name["prompt-0"]["comparisons"]["layout"]["kl_max"] < EXACT_KL  # text never reaches the tower
    assert by_name["image"]["comparisons"]["layout"]["kl_max"] > 100 * v["layout"]["max_kl"], kind
    assert not r.passed

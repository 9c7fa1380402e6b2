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

import numpy as np
import pytest
import torch

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

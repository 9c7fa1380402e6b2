"""DeepSeek-V4 reference forward (converters/verify/reference/deepseek4.py): hyper-connection streams, sliding-window /
CSA (overlapping windows + lightning indexer) / HCA compressed attention with sinks, partial interleaved RoPE undone on
the output, grouped output projection, hash-routed and biased sqrtsoftplus MoE with clipped SwiGLU, the hc_head.

1. The JAX reference against transformers on weights laid out by numpy (not the converter), float32, one 300-token
   prompt (sliding layers see 8 keys, the CSA layers' indexers keep 4 of up to 75 entries, the HCA layers (ratio 128)
   see 2): KL < 1e-9, scanned and unscanned (measured max 1.6e-12); the converter's checkpoints give the same.
   The tiny model has 32 indexer heads: with 4, about 6% of the indexer's scores are exactly 0 (every head's ReLU
   is), and torch.topk and jax.lax.top_k (MaxText) break those ties differently.
4. `verify` end to end (content, layout, precision; transformers' side collapses the streams with `hc_head` before its
   final norm) passes the converter's float32 checkpoints, scanned and unscanned.
2. Plausible wrong mappings move the logits far beyond the layout check's threshold (1e-5; each test names its KL).
3. What MaxText cannot express is refused (CSA rate != 4, hash layers not a prefix, several KV heads, ...), the scanned
   layout is MaxText's (HCA / CSA alternating after the hash layers), and the YaRN the published config gives the
   compressed layers is transformers' (MaxText has none: a config warning).

MaxText itself (bench/maxtext_logits.py, deepseek4-tiny with the HF dims, float32, 300 random tokens, this tiny model
converted by ckptflow): KL to transformers max 1.4e-12, to the reference 1.1e-12, scanned and unscanned. With the
family's 4 indexer heads MaxText and the reference still agree (1.1e-12) while both differ from transformers by
5.8e-2 (the ties above). With swiglu_limit 0.3 MaxText differs from transformers by KL 0.6 mean: it does not clip
the shared expert (the reference does, as transformers).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters import tiny_models
from converters.convert import hf_to_maxtext
from converters.errors import CkptflowError, UnsupportedModelError
from converters.io.orbax import read_params
from converters.tiny_models import make_test_model
from converters.verify.metrics import kl_per_token
from converters.verify.reference import ReferenceModel
from converters.verify.reference.common import hf_config_object
from converters.verify.reference.deepseek4 import DeepseekV4Forward
from tests.families.helpers import deepseek4_layer_layout as layer_layout
from tests.families.helpers import deepseek4_layout as layout
from tests.families.helpers import deepseek4_ratios as ratios
from tests.families.helpers import hf_tensors

LAYERS, INDEX_HEADS = 7, 32
EXACT_KL, LAYOUT_KL = 1e-9, 1e-5
IDS = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=300)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(folder, config, float32 HF tensors, transformers' logits on IDS) of the 7-layer tiny model: hash-routed
    sliding, sliding, CSA, then [HCA 128, CSA] twice."""
    assert tiny_models.TINY["deepseek4"][1]["index_n_heads"] == INDEX_HEADS  # few heads: indexer ties (docstring)
    src = make_test_model("deepseek4", tmp_path_factory.mktemp("deepseek4") / "hf", layers=LAYERS, dtype="float32")
    cfg = json.loads((src / "config.json").read_text())
    hf = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in hf_tensors(src).items()}
    want, csa = _transformers(src)
    assert float(np.std(want)) > 0.5
    return src, cfg, hf, want, csa


def _transformers(src):
    """transformers' float32 logits on IDS, and (input, output) of the first CSA layer's attention (layer 2)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager").eval()
    seen = {}
    hook = model.model.layers[2].self_attn.register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(
            h=(args or [kwargs.get("hidden_states")])[0][0].numpy(), out=out[0][0].numpy()
        ),
        with_kwargs=True,
    )
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].numpy()
    hook.remove()
    return logits, (seen["h"], seen["out"])


def kl_max(cfg: dict, params: dict, want: np.ndarray) -> float:
    return float(kl_per_token(want, ReferenceModel(params, cfg).logits(IDS)).max())


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_reference_matches_transformers(model, scan):
    _, cfg, hf, want, _ = model
    assert ratios(cfg) == [0, 0, 4, 128, 4, 128, 4] and cfg["index_topk"] < len(IDS) // 4
    assert cfg["mlp_layer_types"] == ["hash_moe"] * 3 + ["moe"] * 4
    assert kl_max(cfg, layout(hf, cfg, scan), want) < EXACT_KL


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_checkpoint_gives_the_same_logits(model, tmp_path, scan):
    src, cfg, _, want, _ = model
    hf_to_maxtext(src, tmp_path / "mt", scan=scan, dtype="float32")
    assert kl_max(cfg, read_params(tmp_path / "mt"), want) < EXACT_KL


def test_the_indexer_selects(model):
    """The CSA attention of layer 2 on transformers' own input gives transformers' output; keeping every compressed
    entry instead (index_topk >= their number) changes it from the first query that sees index_topk + 1 entries on:
    the selection is exercised. (Eager, on the layer alone.)"""
    import jax.numpy as jnp

    _, cfg, hf, _, (h, out) = model
    forward, params = DeepseekV4Forward(), layer_layout(hf, cfg, 2)
    positions = jnp.arange(len(IDS), dtype=jnp.int32)
    first = 4 * (cfg["index_topk"] + 1) - 1
    for topk, same in ((cfg["index_topk"], len(IDS)), (len(IDS), first)):
        spec = _spec({**cfg, "index_topk": topk})
        got = np.asarray(
            forward.attention(spec, {k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(h), positions)
        )
        err = np.abs(got - out).max(axis=-1) / np.abs(out).max()
        assert err[:same].max() < 1e-5 and (same == len(IDS) or err[same:].min() > 1e-3), (topk, err.max())


def _swap(keys: tuple[str, str]):
    def damage(lay: dict) -> None:
        a, b = keys
        lay[a], lay[b] = lay[b], lay[a]

    return damage


def _group_rows_transposed(lay: dict) -> None:
    """HF wo_a's rows read as [R, G] (row r * G + g) instead of [G, R]."""
    k = "self_attention/o_a_proj/kernel"
    g, i, r = lay[k].shape
    rows = lay[k].transpose(0, 2, 1).reshape(g * r, i)  # back to HF's [G*R, in]
    lay[k] = rows.reshape(r, g, i).transpose(1, 2, 0)


def _rope_as_halves(lay: dict) -> None:
    """Llama's half-split -> interleaved permutation applied to the rope slice of the query and key/value heads."""
    for k in ("self_attention/wq_b/kernel", "self_attention/wkv/kernel"):
        w = lay[k].copy()
        rope = 16  # qk_rope_head_dim of the tiny model (the trailing channels of a head)
        tail = w[..., -rope:]
        w[..., -rope:] = np.stack([tail[..., : rope // 2], tail[..., rope // 2 :]], axis=-1).reshape(tail.shape)
        lay[k] = w


def _tid2eid_off_by_one(lay: dict) -> None:
    if "mlp/MoeBlock_0/tid2eid" in lay:
        lay["mlp/MoeBlock_0/tid2eid"] = np.roll(lay["mlp/MoeBlock_0/tid2eid"], 1, axis=0)


# name -> (the damage done to every layer's numpy layout, the KL max it gave on the 300-token prompt with the tiny
# model as of this test); the layout check fails above 1e-5
WRONG_MAPPINGS = {
    "pre/post alpha swapped": (_swap(("mhc_attention/pre_alpha", "mhc_attention/post_alpha")), 0.105),
    "pre/post beta swapped": (_swap(("mhc_mlp/pre_beta", "mhc_mlp/post_beta")), 0.127),
    "o_a_proj groups transposed": (_group_rows_transposed, 0.618),
    "RoPE pairs as halves": (_rope_as_halves, 0.602),
    "tid2eid off by one token": (_tid2eid_off_by_one, 0.430),
}


@pytest.mark.parametrize("name", WRONG_MAPPINGS)
def test_plausible_wrong_mappings_fail_layout(model, name):
    _, cfg, hf, want, _ = model
    damage, measured = WRONG_MAPPINGS[name]
    layers = [layer_layout(hf, cfg, i) for i in range(cfg["num_hidden_layers"])]
    for lay in layers:
        damage(lay)
    kl = kl_max(cfg, layout(hf, cfg, False, layers), want)
    assert kl > 100 * LAYOUT_KL, (kl, measured)


def test_hca_and_csa_layers_swapped_in_the_scanned_blocks(model):
    """The scanned stacks filled with the other kind's layers: with their compressors as named, the checkpoint lacks
    what the block needs; with the compressors kept in place, the layers' other arrays swapped fail the layout."""
    _, cfg, hf, want, _ = model
    layers = [layer_layout(hf, cfg, i) for i in range(cfg["num_hidden_layers"])]
    swapped = layers[:3] + [layers[4], layers[3], layers[6], layers[5]]
    with pytest.raises(CkptflowError, match="hca_compressor"):
        ReferenceModel(layout(hf, cfg, True, swapped), cfg)
    compressors = ("self_attention/hca_compressor/", "self_attention/csa_compressor/")
    kept = [
        {k: v for k, v in other.items() if not k.startswith(compressors)}
        | {k: v for k, v in own.items() if k.startswith(compressors)}
        for own, other in zip(layers, swapped)
    ]
    kl = kl_max(cfg, layout(hf, cfg, True, kept), want)
    assert kl > 100 * LAYOUT_KL, kl  # measured 0.299


def _spec(cfg: dict):
    return DeepseekV4Forward().make_spec(hf_config_object(cfg))


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"compress_rates": {"compressed_sparse_attention": 8, "heavily_compressed_attention": 128}}, "CSA"),
        ({"compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 4}}, "HCA"),
        ({"mlp_layer_types": ["moe", "hash_moe"] + ["moe"] * 5}, "prefix"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"n_shared_experts": 2}, "n_shared_experts"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_reference_refuses_what_maxtext_cannot_express(model, change, reason):
    _, cfg, _, _, _ = model
    with pytest.raises(UnsupportedModelError, match=reason):
        _spec({**cfg, **change})


def test_scanned_layout_is_maxtexts_block(model):
    _, cfg, hf, _, _ = model
    forward, spec = DeepseekV4Forward(), _spec(cfg)
    keys = layout(hf, cfg, True)
    assert forward.detect_layout(spec, keys).scanned and not forward.detect_layout(spec, layout(hf, cfg, False)).scanned
    other = {**cfg, "layer_types": cfg["layer_types"][:3] + ["compressed_sparse_attention"] * 4}
    with pytest.raises(CkptflowError, match="alternate"):
        forward.detect_layout(_spec(other), keys)
    # an HCA ratio MaxText's scanned block does not build: read all the same, with a warning
    hca8 = {**cfg, "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}}
    layout8 = forward.detect_layout(_spec(hca8), keys)
    assert any("128" in w for w in forward.layout_warnings(_spec(hca8), layout8))
    assert not forward.layout_warnings(spec, forward.detect_layout(spec, keys))


def test_compressed_yarn_is_transformers_and_warned(model):
    """The published config's rope_scaling: transformers gives the compressed layers YaRN frequencies (attention
    factor 1), which the reference uses; MaxText has no YaRN for deepseek4, hence the warning."""
    import torch
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    _, cfg, _, _, _ = model
    yarn = {"type": "yarn", "factor": 16, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
    published = {k: v for k, v in cfg.items() if k != "rope_parameters"} | {"rope_scaling": yarn}
    hf_cfg = hf_config_object(published)
    forward, spec = DeepseekV4Forward(), _spec(published)
    rotary = DeepseekV4RotaryEmbedding(hf_cfg)
    for compressed, kind in ((True, "compress"), (False, "main")):
        theirs = getattr(rotary, f"{kind}_inv_freq").numpy()
        assert np.allclose(np.asarray(forward.inv_freq(spec, compressed)), theirs, rtol=1e-6, atol=0)
        assert getattr(rotary, f"{kind}_attention_scaling") == 1.0
    plain = np.asarray(forward.inv_freq(_spec(cfg), True))
    assert not np.allclose(plain, rotary.compress_inv_freq.numpy())  # YaRN changes the low frequencies
    warnings = forward.config_warnings(hf_cfg)
    assert any("YaRN" in w for w in warnings) and any("shared expert" in w for w in warnings)
    assert torch.is_tensor(rotary.compress_inv_freq)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
def test_converted_checkpoint_verifies(model, tmp_path, scan):
    from converters.verify import verify

    src = model[0]
    hf_to_maxtext(src, tmp_path / "mt", scan=scan, dtype="float32")
    r = verify(maxtext=tmp_path / "mt", hf=src)
    s = r.data["summary"]
    assert r.passed and s["kl_max"] < EXACT_KL and r.data["verdict"]["layout"]["kl_max"] < EXACT_KL, s
    assert r.data["verdict"]["content"]["passed"]
    assert r.data["maxtext"]["layout"] == ("scanned" if scan else "unscanned")

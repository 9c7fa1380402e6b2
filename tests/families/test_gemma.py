"""Gemma2 and Gemma3 (text and multimodal): round trips, stored values, dropped vocab rows, transformers load,
config.json.

Tiny models (`converters.tiny_models.TINY`): hidden 72 so sqrt(hidden) = 8.485 is not a power of two (Gemma3
bakes bf16(8.485) = 8.5); Gemma2 query_pre_attn_scalar 24 so 1/sqrt(24) is not one either; Gemma3 with 14
layers = two scanned 6-layer blocks + a 2-layer remainder, vocab 576 of which MaxText holds 512 (like
262208 -> 262144); Gemma2 vocab 512 padded to 640 (like 256000 -> 256128).

Tolerances. Element moves (transpose, reshape, permutation) are bit-exact. The value-changing transforms are
computed in float32 and rounded once to the stored dtype:
  * RMSNorm weights: MaxText stores 1 + w. Round trip error <= half an ulp of (1 + w) in the MaxText dtype
    plus half an ulp of w in the HF dtype -- an absolute bound: a bfloat16 MaxText checkpoint cannot hold a
    small w to better than 2^-9 (MaxText's own format limit). With a float32 MaxText checkpoint a bf16 HF model
    comes back bit-exact (`test_bf16_model_through_float32_maxtext_is_lossless`).
  * sqrt(hidden) embedding scale (both) and Gemma2's 1/sqrt(query_pre_attn_scalar) query scale: rounded on
    the way in and on the way out, so within one ulp of the stored dtype (exact when the scale is a power of
    two, e.g. 1/16 for 2B/9B).
"""

from __future__ import annotations

import json
import math
import shutil
import warnings

import ml_dtypes
import numpy as np
import pytest

from converters.convert import DROPPED_ROWS, hf_to_maxtext, maxtext_to_hf
from converters.core import registry
from converters.errors import MappingError
from converters.families.gemma import Gemma2, Gemma3, bf16
from converters.io.orbax import read_params
from converters.io.safetensors import SafetensorsFile, SafetensorsFolder, read_tensor
from converters.tiny_models import make_test_model, tiny_config

FAMILIES = ("gemma2", "gemma3", "gemma3-mm")
SHAPE = {"gemma2": (4, 512), "gemma3": (14, 576), "gemma3-mm": (8, 576)}  # (layers, vocab)
EMB = {
    "gemma2": "model.embed_tokens.weight",
    "gemma3": "model.embed_tokens.weight",
    "gemma3-mm": "language_model.model.embed_tokens.weight",
}
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """`gemma(family, dtype)` -> path of a saved tiny random HF model, cached per module."""
    cache: dict = {}

    def make(family: str, dtype: str = "bfloat16"):
        if (family, dtype) not in cache:
            layers, vocab = SHAPE[family]
            out = tmp_path_factory.mktemp(f"{family}-{dtype}") / "model"
            cache[family, dtype] = make_test_model(family, out, layers=layers, vocab=vocab, dtype=dtype)
        return cache[family, dtype]

    return make


def hf_tensors(path) -> dict:
    f = SafetensorsFolder(path)
    return {n: f.read(n) for n in f.tensors}


def ulp(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Spacing of `dtype` at |x| (normal numbers): 2^(exponent - mantissa bits)."""
    bits = {np.dtype(np.float32): 23, BF16: 7}[np.dtype(dtype)]
    x = np.abs(np.asarray(x, np.float64))
    return 2.0 ** (np.floor(np.log2(np.maximum(x, 1e-30))) - bits)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    ints = {2: np.int16, 4: np.int32}[a.dtype.itemsize]
    return int(np.abs(a.view(ints).astype(np.int64) - b.view(ints).astype(np.int64)).max()) if a.size else 0


def kind(hf_name: str) -> str:
    if "norm" in hf_name and "vision_tower" not in hf_name:
        return "norm"  # +1 (decoder norms, q/k norms, the projector's soft-embedding norm)
    if hf_name.endswith("embed_tokens.weight") or hf_name.endswith("q_proj.weight") and "vision_tower" not in hf_name:
        return "scaled"  # sqrt(E) (both), 1/sqrt(query_pre_attn_scalar) (Gemma2 only, Gemma3 stays exact)
    return "moved"


def assert_round_trip(original: dict, back: dict, mt_dtype: np.dtype):
    assert sorted(original) == sorted(back)
    for name, x in original.items():
        y = back[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        k = kind(name)
        if k == "norm":
            w = x.astype(np.float64)
            bound = 0.5 * ulp(1.0 + w, mt_dtype) + 0.5 * ulp(w, x.dtype)
            assert np.all(np.abs(y.astype(np.float64) - w) <= bound), name
        elif k == "scaled":
            assert ulp_distance(x, y) <= 1, name
        else:
            assert ulp_distance(x, y) == 0, f"{name} not bit-exact"


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    "scan,dtype",
    [(True, "bfloat16"), (False, "bfloat16"), (True, "float32")],
    ids=["scanned-bf16", "unscanned-bf16", "scanned-f32"],
)
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_maxtext_hf_round_trip(gemma, tmp_path, family, scan, dtype):
    src = gemma(family, dtype)
    hf_to_maxtext(src, tmp_path / "mt", scan=scan, dtype=dtype)
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype=dtype)
    assert_round_trip(hf_tensors(src), hf_tensors(tmp_path / "hf"), np.dtype(dtype) if dtype == "float32" else BF16)
    # MaxText -> HF -> MaxText: the same arrays in the same layout (norm scales y = 1 + w come back exactly when
    # y - 1 is representable, i.e. 0.5 <= y: every norm of these models; scaled tensors within one ulp)
    hf_to_maxtext(tmp_path / "hf", tmp_path / "mt2", scan=scan, dtype=dtype)
    a, b = read_params(tmp_path / "mt"), read_params(tmp_path / "mt2")
    assert sorted(a) == sorted(b)
    for path in a:
        limit = 1 if path == "token_embedder/embedding" or "query/kernel" in path and family == "gemma2" else 0
        assert ulp_distance(a[path], b[path]) <= limit, path


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_model_through_float32_maxtext_is_lossless(gemma, tmp_path, family):
    """bf16 HF -> float32 MaxText -> bf16 HF gives every tensor back bit for bit (incl. Gemma3's dropped rows)."""
    src = gemma(family, "bfloat16")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="bfloat16")
    want, got = hf_tensors(src), hf_tensors(tmp_path / "hf")
    assert sorted(want) == sorted(got)
    for name in want:
        assert ulp_distance(want[name], got[name]) == 0, name


# ------------------------------------------------------------------------------------------------ stored values


def test_gemma2_stored_values_and_layout(gemma, tmp_path):
    src = gemma("gemma2", "float32")
    cfg = json.loads((src / "config.json").read_text())
    hf = hf_tensors(src)
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="bfloat16")
    mt = read_params(tmp_path / "mt")
    E, V = cfg["hidden_size"], cfg["vocab_size"]

    # embedding: x sqrt(E) in float32 (exact sqrt), rounded once to bf16; 128 zero rows of MaxText padding
    emb = mt["token_embedder/embedding"]
    assert emb.shape == (V + 128, E) and emb.dtype == BF16
    np.testing.assert_array_equal(emb[:V], (hf["model.embed_tokens.weight"] * np.float32(math.sqrt(E))).astype(BF16))
    assert not emb[V:].any()
    # layer m of the scan = (HF layer 2m local, 2m + 1 global); norms + 1 in float32, rounded once
    for m in range(2):
        for half, layer in (("local", 2 * m), ("global", 2 * m + 1)):
            p = f"model.layers.{layer}."
            np.testing.assert_array_equal(
                mt[f"decoder/layers/pre_ffw_norm_{half}/scale"][:, m],
                (hf[p + "pre_feedforward_layernorm.weight"] + np.float32(1)).astype(BF16),
            )
            # query: 1/sqrt(query_pre_attn_scalar) = 1/sqrt(24), not 1/sqrt(head_dim) (the upstream 27B mistake)
            q = hf[p + "self_attn.q_proj.weight"].T.reshape(E, 4, 16) * np.float32(24**-0.5)
            np.testing.assert_array_equal(
                mt[f"decoder/layers/self_attention_{half}/query/kernel"][:, m], q.astype(BF16)
            )
            np.testing.assert_array_equal(
                mt[f"decoder/layers/mlp_{half}/wo/kernel"][:, m], hf[p + "mlp.down_proj.weight"].T.astype(BF16)
            )
    np.testing.assert_array_equal(
        mt["decoder/decoder_norm/scale"], (hf["model.norm.weight"] + np.float32(1)).astype(BF16)
    )
    assert "decoder/logits_dense/kernel" not in mt


def test_gemma3_stored_values_and_layout(gemma, tmp_path):
    src = gemma("gemma3", "float32")
    hf = hf_tensors(src)
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    mt = read_params(tmp_path / "mt")
    # embedding: x bf16(sqrt(72)) = 8.5 in float32; the 64 rows past 512 are not in MaxText
    assert bf16(math.sqrt(72)) == 8.5
    np.testing.assert_array_equal(
        mt["token_embedder/embedding"], hf["model.embed_tokens.weight"][:512] * np.float32(8.5)
    )
    # 14 layers: decoder/layers/layers_b holds HF layers b and 6 + b; the remainder layers 12, 13 unstacked
    for b in range(6):
        for j in range(2):
            p = f"model.layers.{6 * j + b}.self_attn."
            np.testing.assert_array_equal(
                mt[f"decoder/layers/layers_{b}/self_attention/query_norm/scale"][:, j],
                hf[p + "q_norm.weight"] + np.float32(1),
            )
            np.testing.assert_array_equal(
                mt[f"decoder/layers/layers_{b}/self_attention/query/kernel"][:, j],
                hf[p + "q_proj.weight"].T.reshape(72, 4, 16),
            )
    for r in range(2):
        p = f"model.layers.{12 + r}."
        np.testing.assert_array_equal(
            mt[f"decoder/layers_remainder/layers_{r}/self_attention/key_norm/scale"],
            hf[p + "self_attn.k_norm.weight"] + np.float32(1),
        )
        np.testing.assert_array_equal(
            mt[f"decoder/layers_remainder/layers_{r}/mlp/wi_0/kernel"], hf[p + "mlp.gate_proj.weight"].T
        )
    assert not any(k.startswith("vision_encoder/") for k in mt)


def test_gemma3_vision_tower_layout(gemma, tmp_path):
    src = gemma("gemma3-mm", "float32")
    hf = hf_tensors(src)
    hf_to_maxtext(src, tmp_path / "mt", scan=False, dtype="float32")
    mt = read_params(tmp_path / "mt")
    ve, vt = "vision_encoder/Gemma3VisionEncoderLayer_0/", "vision_tower.vision_model."
    np.testing.assert_array_equal(
        mt[ve + "embedding/kernel"], hf[vt + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)
    )  # [P,P,C,H]
    np.testing.assert_array_equal(mt[ve + "pos_embedding"], hf[vt + "embeddings.position_embedding.weight"][None])
    b = ve + "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/"
    np.testing.assert_array_equal(
        mt[b + "key/kernel"], hf[vt + "encoder.layers.1.self_attn.k_proj.weight"].T.reshape(32, 2, 16)
    )
    np.testing.assert_array_equal(mt[b + "key/bias"], hf[vt + "encoder.layers.1.self_attn.k_proj.bias"].reshape(2, 16))
    np.testing.assert_array_equal(
        mt[b + "out/kernel"], hf[vt + "encoder.layers.1.self_attn.out_proj.weight"].T.reshape(2, 16, 32)
    )
    # SigLIP LayerNorms are real LayerNorms: no +1. The projector's RMSNorm is Gemma's: +1.
    np.testing.assert_array_equal(
        mt[ve + "Transformer/encoderblock_0/LayerNorm_1/scale"], hf[vt + "encoder.layers.0.layer_norm2.weight"]
    )
    pj = "vision_encoder/VisionEmbedder_0/"
    np.testing.assert_array_equal(
        mt[pj + "mm_soft_embedding_norm/scale"], hf["multi_modal_projector.mm_soft_emb_norm.weight"] + np.float32(1)
    )
    np.testing.assert_array_equal(
        mt[pj + "mm_input_projection/w"], hf["multi_modal_projector.mm_input_projection_weight"]
    )
    assert sum(k.startswith("vision_encoder/") for k in mt) == 2 * 16 + 5 + 2
    assert "decoder/layers_7/mlp/wo/kernel" in mt and not any(k.startswith("decoder/layers/") for k in mt)
    # plain Orbax sees MaxText's multimodal tree (use_multimodal=true adds the vision_encoder root)
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore((tmp_path / "mt" / "0" / "items").absolute())["params"]["params"]
    assert set(tree) == {"token_embedder", "decoder", "vision_encoder"}
    assert set(tree["vision_encoder"]) == {"Gemma3VisionEncoderLayer_0", "VisionEmbedder_0"}


# ------------------------------------------------------------------------------------ rows MaxText cannot hold


def test_dropped_vocab_rows_kept_beside_the_checkpoint(gemma, tmp_path):
    src = gemma("gemma3-mm", "bfloat16")
    name = EMB["gemma3-mm"]
    original = SafetensorsFolder(src).read(name)
    hf_to_maxtext(src, tmp_path / "mt", scan=True)
    assert read_params(tmp_path / "mt")["token_embedder/embedding"].shape == (512, 72)
    rows = SafetensorsFile(tmp_path / "mt" / DROPPED_ROWS).tensors  # one plain safetensors file, source dtype
    assert list(rows) == [name] and rows[name].dtype == BF16
    np.testing.assert_array_equal(read_tensor(rows[name]).view(np.int16), original[512:].view(np.int16))

    # restored on export (the round trip tests check every other tensor)
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf")
    np.testing.assert_array_equal(
        SafetensorsFolder(tmp_path / "hf").read(name)[512:].view(np.int16), original[512:].view(np.int16)
    )

    # without the sidecar (e.g. a MaxText training run): zeros, the published shape, and a warning
    shutil.copytree(tmp_path / "mt", tmp_path / "mt-bare")
    (tmp_path / "mt-bare" / DROPPED_ROWS).unlink()
    with pytest.warns(UserWarning, match="written as zeros"):
        maxtext_to_hf(tmp_path / "mt-bare", tmp_path / "hf-bare")
    got = SafetensorsFolder(tmp_path / "hf-bare").read(name)
    assert got.shape == original.shape and not got[512:].astype(np.float32).any()
    assert ulp_distance(got[:512], original[:512]) <= 1
    assert json.loads((tmp_path / "hf-bare" / "config.json").read_text())["text_config"]["vocab_size"] == 576


def test_padded_rows_dropped_on_export(gemma, tmp_path):
    src = gemma("gemma2", "bfloat16")
    hf_to_maxtext(src, tmp_path / "mt", scan=False)
    assert read_params(tmp_path / "mt")["token_embedder/embedding"].shape == (640, 72)
    assert not (tmp_path / "mt" / DROPPED_ROWS).exists()
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf")
    assert SafetensorsFolder(tmp_path / "hf").read("model.embed_tokens.weight").shape == (512, 72)


# ------------------------------------------------------------------------------------ transformers, config.json


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_folder_loads_in_transformers_with_same_logits(gemma, tmp_path, family):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    src = gemma(family, "float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf", dtype="float32")
    want_cfg, got_cfg = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(tmp_path / "hf")
    assert type(got_cfg) is type(want_cfg)
    wt, gt = want_cfg.get_text_config(), got_cfg.get_text_config()
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "query_pre_attn_scalar",
        "sliding_window",
        "layer_types",
        "rope_parameters",
        "hidden_activation",
        "final_logit_softcapping",
        "attn_logit_softcapping",
        "rms_norm_eps",
        "tie_word_embeddings",
    ):
        assert getattr(gt, key) == getattr(wt, key), key
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == want_cfg.architectures

    ids = torch.tensor([[1, 5, 77, 300, 12, 499, 3, 8, 250, 100, 42, 7, 9, 11, 13, 200, 201, 202, 17]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits
    # float32 throughout: norms and scaled tensors within one float32 ulp, so the logits agree to float32 noise
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [m for f in (Gemma2, Gemma3) for m in f.models])
def test_exported_config_json_for_real_sizes(name):
    """What `maxtext_to_hf --model NAME` writes: explicit, correct values (MaxText's exporter gets several wrong)."""
    from transformers import AutoConfig

    family, cfg = registry.model(name)
    out = family.export_config(cfg, "bfloat16")
    c = AutoConfig.for_model(**{k: v for k, v in out.items() if k not in ("architectures", "dtype")})
    t = c.get_text_config()
    size = name.split("-")[1]
    assert t.hidden_activation == "gelu_pytorch_tanh" and t.tie_word_embeddings
    if family is Gemma2:
        assert out["architectures"] == ["Gemma2ForCausalLM"]
        assert t.query_pre_attn_scalar == {"2b": 256, "9b": 256, "27b": 144}[size]  # not 224 (9b) / head_dim (27b)
        assert (t.final_logit_softcapping, t.attn_logit_softcapping, t.sliding_window) == (30.0, 50.0, 4096)
        assert t.vocab_size == 256000 and t.rope_parameters["rope_theta"] == 10000.0
        assert t.layer_types[:2] == ["sliding_attention", "full_attention"]
    else:
        assert out["architectures"] == ["Gemma3ForConditionalGeneration"]
        assert t.query_pre_attn_scalar == {"4b": 256, "12b": 256, "27b": 168}[size]
        assert t.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
        assert t.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
        assert t.sliding_window == 1024 and t.vocab_size == 262208 and t.max_position_embeddings == 131072
        assert t.final_logit_softcapping is None and t.attn_logit_softcapping is None
        assert t.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
        assert c.vision_config.vision_use_head is False and c.vision_config.hidden_act == "gelu_pytorch_tanh"
        assert (c.mm_tokens_per_image, c.image_token_id, c.vision_config.image_size) == (256, 262144, 896)


# ------------------------------------------------------------------------------------ refused configurations


def test_refuses_what_maxtext_cannot_express():
    cfg = tiny_config("gemma2", layers=3)
    with pytest.raises(MappingError, match="odd"):
        Gemma2.plan(cfg, True)
    cfg = tiny_config("gemma3", layers=8)
    with pytest.raises(MappingError, match="sliding_window_pattern"):
        Gemma3.plan({**cfg, "sliding_window_pattern": 4}, True)
    with pytest.raises(MappingError, match="layer_types"):
        Gemma3.plan({**cfg, "layer_types": ["sliding_attention", "full_attention"] * 4}, False)
    mm = tiny_config("gemma3-mm", layers=8)
    with pytest.raises(MappingError, match="vision_use_head"):
        Gemma3.plan({**mm, "vision_config": {**mm["vision_config"], "vision_use_head": True}}, True)
    with pytest.raises(MappingError, match="tie_word_embeddings"):
        Gemma2.plan({**tiny_config("gemma2", layers=2), "tie_word_embeddings": False}, True)


def test_no_warning_on_regular_conversions(gemma, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        hf_to_maxtext(gemma("gemma3", "bfloat16"), tmp_path / "mt", scan=False)
        maxtext_to_hf(tmp_path / "mt", tmp_path / "hf")


# ------------------------------------------------------------------------------------ other writers and readers


def test_reads_transformers5_vision_tower_names(gemma, tmp_path):
    """transformers >= 5 saves the tower as `vision_tower.*`; read the same, export the published names."""
    from converters.io.safetensors import save_file

    src = gemma("gemma3-mm", "bfloat16")
    published = hf_tensors(src)
    renamed = tmp_path / "t5"
    renamed.mkdir()
    shutil.copy(src / "config.json", renamed / "config.json")
    save_file(
        renamed / "model.safetensors",
        {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in published.items()},
    )
    assert "vision_tower.embeddings.patch_embedding.weight" in SafetensorsFolder(renamed).tensors
    hf_to_maxtext(renamed, tmp_path / "mt", scan=True, dtype="float32")
    maxtext_to_hf(tmp_path / "mt", tmp_path / "hf")
    got = hf_tensors(tmp_path / "hf")
    assert sorted(got) == sorted(published)
    assert all(ulp_distance(got[n], published[n]) == 0 for n in published)


def test_checkpoint_without_vision_tower_exports_the_text_model(gemma, tmp_path):
    """MaxText trains Gemma3 text-only by default (use_multimodal=false): such a checkpoint with the published
    multimodal config exports as Gemma3ForCausalLM, which computes the same text logits."""
    import orbax.checkpoint as ocp
    import torch
    from transformers import AutoModelForCausalLM

    src = gemma("gemma3-mm", "float32")
    hf_to_maxtext(src, tmp_path / "mt", scan=True, dtype="float32")
    tree = ocp.PyTreeCheckpointer().restore((tmp_path / "mt" / "0" / "items").absolute())
    del tree["params"]["params"]["vision_encoder"]
    tree.pop("opt_state", None)
    ocp.PyTreeCheckpointer().save((tmp_path / "text" / "0" / "items").absolute(), tree)  # no sidecar: a training run
    with pytest.warns(UserWarning) as caught:
        maxtext_to_hf(tmp_path / "text", tmp_path / "hf", hf_config=str(src / "config.json"), dtype="float32")
    messages = " | ".join(str(w.message) for w in caught)
    assert "no vision tower" in messages and "written as zeros" in messages  # no sidecar: rows 512.. are zeros
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert "model.embed_tokens.weight" in SafetensorsFolder(tmp_path / "hf").tensors

    ids = torch.tensor([[1, 5, 77, 300, 12, 499, 3, 8, 250, 100, 42, 7, 9, 11, 13, 200, 201, 202, 17]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits[..., :512]
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(ids).logits[..., :512]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

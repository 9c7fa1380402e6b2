"""Gemma2 / Gemma3 reference forward: against transformers directly, then end to end with the converter.

1. The JAX reference on weights laid out by a few lines of numpy written here from the format contract (not by
   the converter), with the exact float32 sqrt(hidden) baked into the embedding: the reference must then
   reproduce transformers' float32 logits to accumulation noise (KL < 1e-9), scanned and unscanned, text and
   image prompts.
2. `verify()` on checkpoints written by the converter. Measured max per-token KL on these tiny models:
   Gemma2 float32 ~3e-13; Gemma3 float32 ~7e-6 -- not noise: MaxText's Gemma3 embedding holds sqrt(hidden)
   rounded to bf16 (8.5 for the tiny 72-wide model, 50.5 for 4B) while transformers' float32 forward multiplies
   by the exact 8.485 and the tied output divides by the exact value, so MaxText's logits are 0.17% larger
   (transformers' bf16 forward rounds the same way); bfloat16 runs <= 1e-3.
3. A broken conversion fails: RMSNorm scales without the +1 (the classic Gemma bug), and for the image prompt a
   transposed patch embedding.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters.verify import DEFAULT_MAX_KL, verify
from converters.verify.metrics import kl_per_token
from converters.verify.reference import ReferenceModel
from converters.verify.reference.gemma import gemma3_image_prompt, multimodal_logits

SHAPE = {"gemma2": (4, 512), "gemma3": (14, 576), "gemma3-mm": (8, 576)}  # as tests/families/test_gemma.py
EXACT_KL = 1e-9
FLOAT32_MAX_KL = {"gemma2": 1e-9, "gemma3": 1e-4, "gemma3-mm": 1e-4}  # see the module docstring


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """`hf_model(family)` -> folder of a float32 tiny random model."""
    from converters.tiny_models import make_test_model

    cache: dict = {}

    def make(family: str) -> Path:
        if family not in cache:
            layers, vocab = SHAPE[family]
            cache[family] = make_test_model(
                family, tmp_path_factory.mktemp(family) / "hf", layers=layers, vocab=vocab, dtype="float32"
            )
        return cache[family]

    return make


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    """`converted(family, scan)` -> (hf folder, MaxText checkpoint written by the converter, float32)."""
    from converters.convert import hf_to_maxtext

    cache: dict = {}

    def make(family: str, scan: bool = True):
        if (family, scan) not in cache:
            out = tmp_path_factory.mktemp(f"{family}-{scan}") / "mt"
            hf_to_maxtext(hf_model(family), out, scan=scan, dtype="float32")
            cache[family, scan] = (hf_model(family), out)
        return cache[family, scan]

    return make


# ---------------------------------------------------------------------------------------------------- 1.


def to_maxtext(model, scan: bool) -> dict:
    """transformers state dict (in-memory names) -> MaxText arrays, from the format contract."""
    cfg = model.config
    mm = cfg.model_type == "gemma3"
    t = cfg.get_text_config()
    sd = {n: p.detach().float().numpy() for n, p in model.state_dict().items()}
    lm = "model.language_model." if mm else "model."
    E, N, K, D, L = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.num_hidden_layers
    one = np.float32(1)
    out = {
        "token_embedder/embedding": sd[lm + "embed_tokens.weight"] * np.float32(math.sqrt(E)),  # exact sqrt here
        "decoder/decoder_norm/scale": sd[lm + "norm.weight"] + one,
    }
    if cfg.model_type == "gemma2":  # MaxText pads 128 zero rows (256000 -> 256128)
        out["token_embedder/embedding"] = np.concatenate(
            [out["token_embedder/embedding"], np.zeros((128, E), np.float32)]
        )
    else:  # and holds Gemma3's vocabulary cut to a multiple of 128 (262208 -> 262144)
        out["token_embedder/embedding"] = out["token_embedder/embedding"][: t.vocab_size // 128 * 128]

    def layer(i: int, sfx: str = "") -> dict:
        p = f"{lm}layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].T.reshape(E, N, D)
        if cfg.model_type == "gemma2":
            q = q / np.sqrt(np.float32(t.query_pre_attn_scalar))
        lay = {
            f"pre_self_attention_norm{sfx}/scale": sd[p + "input_layernorm.weight"] + one,
            f"post_self_attention_norm{sfx}/scale": sd[p + "post_attention_layernorm.weight"] + one,
            f"pre_ffw_norm{sfx}/scale": sd[p + "pre_feedforward_layernorm.weight"] + one,
            f"post_ffw_norm{sfx}/scale": sd[p + "post_feedforward_layernorm.weight"] + one,
            f"self_attention{sfx}/query/kernel": q,
            f"self_attention{sfx}/key/kernel": sd[p + "self_attn.k_proj.weight"].T.reshape(E, K, D),
            f"self_attention{sfx}/value/kernel": sd[p + "self_attn.v_proj.weight"].T.reshape(E, K, D),
            f"self_attention{sfx}/out/kernel": sd[p + "self_attn.o_proj.weight"].T.reshape(N, D, E),
            f"mlp{sfx}/wi_0/kernel": sd[p + "mlp.gate_proj.weight"].T,
            f"mlp{sfx}/wi_1/kernel": sd[p + "mlp.up_proj.weight"].T,
            f"mlp{sfx}/wo/kernel": sd[p + "mlp.down_proj.weight"].T,
        }
        if cfg.model_type != "gemma2":
            lay["self_attention/query_norm/scale"] = sd[p + "self_attn.q_norm.weight"] + one
            lay["self_attention/key_norm/scale"] = sd[p + "self_attn.k_norm.weight"] + one
        return lay

    def put(groups: dict[str, list[dict]]):  # prefix -> layers (stacked on axis 1 when more than a plain layer)
        for prefix, lays in groups.items():
            if scan and prefix.startswith("decoder/layers/") or prefix == "decoder/layers":
                out.update({f"{prefix}/{k}": np.stack([x[k] for x in lays], axis=1) for k in lays[0]})
            else:
                out.update({f"{prefix}/{k}": v for k, v in lays[0].items()})

    if cfg.model_type == "gemma2":
        pairs = [{**layer(2 * m, "_local"), **layer(2 * m + 1, "_global")} for m in range(L // 2)]
        put({"decoder/layers": pairs} if scan else {f"decoder/layers_{m}": [x] for m, x in enumerate(pairs)})
    elif scan:
        reps = L // 6
        groups = {f"decoder/layers/layers_{b}": [layer(6 * j + b) for j in range(reps)] for b in range(6) if reps}
        groups.update({f"decoder/layers_remainder/layers_{r}": [layer(6 * reps + r)] for r in range(L - 6 * reps)})
        put(groups)
    else:
        put({f"decoder/layers_{i}": [layer(i)] for i in range(L)})

    if mm:
        v = cfg.vision_config
        H, n = v.hidden_size, v.num_attention_heads
        ve, vt = "vision_encoder/Gemma3VisionEncoderLayer_0/", "model.vision_tower."
        out[ve + "embedding/kernel"] = sd[vt + "embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)
        out[ve + "embedding/bias"] = sd[vt + "embeddings.patch_embedding.bias"]
        out[ve + "pos_embedding"] = sd[vt + "embeddings.position_embedding.weight"][None]
        out[ve + "Transformer/encoder_norm/scale"] = sd[vt + "post_layernorm.weight"]
        out[ve + "Transformer/encoder_norm/bias"] = sd[vt + "post_layernorm.bias"]
        for i in range(v.num_hidden_layers):
            b, h = f"{ve}Transformer/encoderblock_{i}/", f"{vt}encoder.layers.{i}."
            a = b + "MultiHeadDotProductAttention_0/"
            out[b + "LayerNorm_0/scale"], out[b + "LayerNorm_0/bias"] = (
                sd[h + "layer_norm1.weight"],
                sd[h + "layer_norm1.bias"],
            )
            out[b + "LayerNorm_1/scale"], out[b + "LayerNorm_1/bias"] = (
                sd[h + "layer_norm2.weight"],
                sd[h + "layer_norm2.bias"],
            )
            for mt, hf in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
                out[a + f"{mt}/kernel"] = sd[h + f"self_attn.{hf}.weight"].T.reshape(H, n, H // n)
                out[a + f"{mt}/bias"] = sd[h + f"self_attn.{hf}.bias"].reshape(n, H // n)
            out[a + "out/kernel"] = sd[h + "self_attn.out_proj.weight"].T.reshape(n, H // n, H)
            out[a + "out/bias"] = sd[h + "self_attn.out_proj.bias"]
            out[b + "MlpBlockViT_0/Dense_0/kernel"], out[b + "MlpBlockViT_0/Dense_0/bias"] = (
                sd[h + "mlp.fc1.weight"].T,
                sd[h + "mlp.fc1.bias"],
            )
            out[b + "MlpBlockViT_0/Dense_1/kernel"], out[b + "MlpBlockViT_0/Dense_1/bias"] = (
                sd[h + "mlp.fc2.weight"].T,
                sd[h + "mlp.fc2.bias"],
            )
        out["vision_encoder/VisionEmbedder_0/mm_input_projection/w"] = sd[
            "model.multi_modal_projector.mm_input_projection_weight"
        ]
        out["vision_encoder/VisionEmbedder_0/mm_soft_embedding_norm/scale"] = (
            sd["model.multi_modal_projector.mm_soft_emb_norm.weight"] + one
        )
    return out


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gemma3-mm"])
def test_reference_matches_transformers(hf_model, family, scan):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        hf_model(family), dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg = json.loads((hf_model(family) / "config.json").read_text())
    ref = ReferenceModel(to_maxtext(model, scan), cfg)
    assert ref.scanned == scan
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 512, size=300)]  # past every sliding window (8)
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].numpy()
    mt = ref.logits(ids)
    assert mt.shape == (300, 640 if family == "gemma2" else 512)
    assert kl_per_token(hf, mt).max() < EXACT_KL
    if family == "gemma3-mm":  # the vision tower, projector and bidirectional image attention
        ids, inputs = gemma3_image_prompt(cfg)
        with torch.no_grad():
            hf = (
                model(
                    torch.tensor([ids]),
                    pixel_values=torch.from_numpy(inputs["pixel_values"]),
                    token_type_ids=torch.from_numpy(inputs["token_type_ids"]),
                )
                .logits[0]
                .numpy()
            )
        assert kl_per_token(hf, multimodal_logits(ref, ids, inputs["pixel_values"])).max() < EXACT_KL


# ---------------------------------------------------------------------------------------------------- 2.


@pytest.mark.parametrize(
    "family,scan", [("gemma2", True), ("gemma2", False), ("gemma3", True), ("gemma3", False), ("gemma3-mm", True)]
)
def test_converted_checkpoint_matches_hf(converted, family, scan):
    hf, ckpt = converted(family, scan)
    r32 = verify(maxtext=ckpt, hf=hf, dtype="float32", max_kl=FLOAT32_MAX_KL[family])
    assert r32.passed, r32.data["summary"]
    names = [p["name"] for p in r32.data["prompts"]]
    assert names == ["short-0", "short-1", "short-2", "long"] + (["image"] if family == "gemma3-mm" else [])
    assert all(p["top10_overlap"] == 10 for p in r32.data["prompts"])
    if scan:
        r16 = verify(maxtext=ckpt, hf=hf, dtype="bfloat16")
        assert r16.passed and r16.data["summary"]["kl_max"] < DEFAULT_MAX_KL, r16.data["summary"]


# ---------------------------------------------------------------------------------------------------- 3.


def _damaged(src: Path, dst: Path, damage) -> Path:
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore((src / "0" / "items").absolute())
    damage(tree["params"]["params"])
    tree.pop("opt_state", None)
    ocp.PyTreeCheckpointer().save((dst / "0" / "items").absolute(), tree)
    shutil.copytree(src / "ckptflow", dst / "ckptflow")
    return dst


def _walk(tree: dict, path: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{path}{k}/")
        else:
            yield tree, k, f"{path}{k}"


def forget_norm_offset(params: dict) -> None:
    """What a converter without Gemma's +1 writes: every RMSNorm scale is HF's w instead of 1 + w."""
    for node, key, path in list(_walk(params)):
        if key == "scale" and "norm" in path and "Gemma3VisionEncoderLayer_0" not in path:
            node[key] = np.asarray(node[key]) - np.asarray(1, node[key].dtype)


def transpose_patches(params: dict) -> None:
    """A patch embedding with height and width swapped (HF [O,I,H,W] -> MaxText [H,W,I,O] done as [W,H,I,O])."""
    for node, key, path in list(_walk(params)):
        if path.endswith("Gemma3VisionEncoderLayer_0/embedding/kernel"):
            node[key] = np.ascontiguousarray(np.asarray(node[key]).transpose(1, 0, 2, 3))


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "gemma3-mm"])
def test_missing_norm_offset_fails(converted, tmp_path, family):
    hf, good = converted(family, True)
    bad = _damaged(good, tmp_path / "bad", forget_norm_offset)
    r = verify(maxtext=bad, hf=hf)
    assert not r.passed
    long = next(p for p in r.data["prompts"] if p["name"] == "long")
    assert long["kl_max"] > DEFAULT_MAX_KL and not long["passed"]


def test_broken_vision_tower_fails_only_the_image_prompt(converted, tmp_path):
    hf, good = converted("gemma3-mm", True)
    r = verify(maxtext=_damaged(good, tmp_path / "bad", transpose_patches), hf=hf, max_kl=FLOAT32_MAX_KL["gemma3-mm"])
    by_name = {p["name"]: p for p in r.data["prompts"]}
    assert not r.passed and not by_name["image"]["passed"] and by_name["image"]["kl_max"] > DEFAULT_MAX_KL
    assert all(p["passed"] for name, p in by_name.items() if name != "image")

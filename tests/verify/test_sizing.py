"""The memory estimate of the streaming `ckptflow verify` (`converters.verify.sizing`).

Expected terms are worked out here from the published configs' numbers, not from the plan the module walks,
so a wrong grouping of layers or experts shows up as a mismatch."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from converters.core.registry import model
from converters.errors import CkptflowError, UnsupportedModelError
from converters.verify import sizing
from converters.verify.sizing import GiB, describe, layer_of, terms, verify_memory_bytes


def cfg_of(name: str) -> dict:
    return model(name)[1]


def attention(h: int, heads: int, kv: int, head_dim: int) -> int:
    """q, k, v and o kernels of grouped-query attention (no biases)."""
    return h * head_dim * (heads + 2 * kv) + heads * head_dim * h


def siglip(v: dict, text_hidden: int) -> int:
    """Gemma3's vision tower and projector (MaxText `vision_encoder/`): patch embedding, position embedding,
    encoder layers (LayerNorms, attention and MLP with biases), final LayerNorm, projection and its norm."""
    H, F, n = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    p = v["patch_size"]
    layer = 2 * 2 * H + 4 * (H * H + H) + (H * F + F) + (F * H + H)
    patches = (v["image_size"] // p) ** 2
    return p * p * v["num_channels"] * H + H + patches * H + n * layer + 2 * H + H * text_hidden + H


def activations(hidden: int, mlp: int, heads: int) -> int:
    T = sizing.PROMPT_TOKENS
    return T * (hidden + mlp + heads * T) * 4 * sizing.ACTIVATION_STREAMS


def expected(name: str) -> dict:
    """L, X, G and the activation bytes of a registry model, from its config numbers."""
    c = cfg_of(name)
    t = c.get("text_config") or c
    h, heads, kv, mlp = t["hidden_size"], t["num_attention_heads"], t.get("num_key_value_heads"), t["intermediate_size"]
    X, G = 0, h  # dense; only the decoder norm is read whole
    if name.startswith("llama3.1"):
        L = attention(h, heads, kv, t["head_dim"]) + 3 * h * mlp + 2 * h
    elif name == "qwen3-235b-a22b":
        # attention + q/k norms + router + 2 norms; the routed experts (gate, up, down) stream one at a time
        L = attention(h, heads, kv, t["head_dim"]) + 2 * t["head_dim"] + h * t["num_experts"] + 2 * h
        mlp = t["moe_intermediate_size"]  # every layer is MoE: `intermediate_size` is unused
        X = 3 * h * mlp
    elif name == "deepseek3-671b":
        q, r, nope, rope, v = (
            t["q_lora_rank"],
            t["kv_lora_rank"],
            t["qk_nope_head_dim"],
            t["qk_rope_head_dim"],
            t["v_head_dim"],
        )
        mla = h * q + q + q * heads * (nope + rope) + h * (r + rope) + r + r * heads * (nope + v) + heads * v * h
        L = mla + 3 * h * mlp + 2 * h  # one of the first dense layers (18432-wide MLP), not a MoE layer
        X = 3 * h * t["moe_intermediate_size"]
    elif name == "gemma3-27b":
        L = attention(h, heads, kv, t["head_dim"]) + 2 * t["head_dim"] + 3 * h * mlp + 4 * h
        G = h + siglip(c["vision_config"], h)  # + the vision tower, read whole
    elif name == "gemma2-27b":
        L = 2 * (attention(h, heads, kv, t["head_dim"]) + 3 * h * mlp + 4 * h)  # a (local, global) pair
    else:
        raise AssertionError(name)
    return {"L": L, "X": X, "G": G, "A": activations(h, mlp, heads)}


MODELS = ("llama3.1-8b", "llama3.1-405b", "qwen3-235b-a22b", "deepseek3-671b", "gemma3-27b", "gemma2-27b")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_terms_match_the_config_numbers(name, dtype):
    want = expected(name)
    t = terms(cfg_of(name), dtype=dtype)
    assert (t.layer_params, t.expert_params, t.global_params) == (want["L"], want["X"], want["G"])
    assert t.activation_bytes == want["A"] and t.row_streamed
    bf16 = 2 if dtype == "bfloat16" else 0  # a bfloat16 copy of the layer and globals for the bfloat16 streams
    h = (cfg_of(name).get("text_config") or cfg_of(name))["hidden_size"]
    logits = (
        sizing.PROMPT_TOKENS * (64 * 2**20 // (4 * h)) * 20 * (5 if dtype == "bfloat16" else 3)
    )  # one vocabulary block
    total = (
        int(1.5 * GiB)
        + want["L"] * (3 * 4 + bf16)
        + 12 * want["X"] * 4
        + want["G"] * (2 * 4 + bf16)
        + 3 * 64 * 2**20
        + want["A"]
        + logits
    )
    assert verify_memory_bytes(cfg_of(name), dtype=dtype) == t.total_bytes == total


def test_gemma2_layer_is_a_pair_and_gemma3_counts_its_vision_tower():
    assert terms(cfg_of("gemma2-27b")).layer_params == 2 * 566_249_472  # a (local, global) pair of HF layers
    g = terms(cfg_of("gemma3-27b")).global_params
    assert 400e6 < g < 450e6  # SigLIP-So400m + projector
    text_only = copy.deepcopy(cfg_of("gemma3-27b"))
    text_only = {**text_only["text_config"], "model_type": "gemma3_text", "tie_word_embeddings": True}
    assert terms(text_only).global_params == text_only["hidden_size"]  # only the decoder norm is left


def test_sizes_of_well_known_models():
    gib = lambda name, dtype="float32": verify_memory_bytes(cfg_of(name), dtype=dtype) / GiB  # noqa: E731
    assert gib("llama3.1-8b") < 6  # whole-model sizing asked for 68 GiB
    assert gib("deepseek3-671b") < 12
    assert gib("llama3.1-405b") < 40
    # bfloat16 runs two more streams on top of the float32 ones: more memory, not less
    assert gib("llama3.1-405b", "bfloat16") > gib("llama3.1-405b")
    assert gib("qwen3-235b-a22b") < gib("llama3.1-70b") < gib("llama3.1-405b")


def test_grows_with_layer_width():
    base = cfg_of("llama3.1-70b")
    wider = {**base, "intermediate_size": 2 * base["intermediate_size"]}
    delta = 3 * 3 * base["hidden_size"] * base["intermediate_size"] * 4 + activations(0, base["intermediate_size"], 0)
    assert verify_memory_bytes(wider) - verify_memory_bytes(base) == delta


@pytest.mark.parametrize("name", MODELS)
def test_does_not_grow_with_depth(name):
    cfg = copy.deepcopy(cfg_of(name))
    c = cfg.get("text_config") or cfg
    c["num_hidden_layers"] *= 2
    assert verify_memory_bytes(cfg) == verify_memory_bytes(cfg_of(name))


@pytest.mark.parametrize(
    "name, key",
    [("qwen3-235b-a22b", "num_experts"), ("deepseek3-671b", "n_routed_experts"), ("mixtral-8x7b", "num_local_experts")],
)
def test_more_experts_change_only_the_router(name, key):
    base = cfg_of(name)
    more = {**base, key: 2 * base[key]}
    a, b = terms(base), terms(more)
    h, E = base["hidden_size"], base[key]
    assert b.expert_params == a.expert_params  # one expert at a time, however many there are
    if name == "deepseek3-671b":
        assert b.layer_params == a.layer_params  # the largest layer is a dense one: no router in it
    else:
        assert b.layer_params - a.layer_params == h * E  # the router's extra columns
    grew = verify_memory_bytes(more) - verify_memory_bytes(base)
    assert 0 <= grew <= 3 * h * E * 4 < 0.01 * verify_memory_bytes(base)  # under 1 %


def test_layers_are_grouped_by_their_maxtext_prefix():
    assert layer_of("decoder/layers_3/mlp/wi_0/kernel") == "decoder/layers_3"
    assert layer_of("decoder/moe_layers_5/MoeBlock_0/wo") == "decoder/moe_layers_5"
    assert layer_of("decoder/dense_layers_0/mlp/wo/kernel") == "decoder/dense_layers_0"
    assert layer_of("decoder/layers_remainder/layers_1/mlp/wo/kernel") == "decoder/layers_remainder/layers_1"
    for path in (
        "decoder/decoder_norm/scale",
        "decoder/logits_dense/kernel",
        "token_embedder/embedding",
        "vision_encoder/Gemma3VisionEncoderLayer_0/Transformer/encoderblock_0/LayerNorm_0/scale",
    ):
        assert layer_of(path) is None, path


def test_bad_input_raises_the_registry_errors():
    with pytest.raises(UnsupportedModelError):
        verify_memory_bytes({"model_type": "bert", "hidden_size": 768})
    with pytest.raises(CkptflowError, match="hidden_size"):
        verify_memory_bytes({**cfg_of("llama3.1-8b"), "hidden_size": "big"})
    with pytest.raises(CkptflowError, match="missing"):
        verify_memory_bytes({"model_type": "llama"})
    with pytest.raises(CkptflowError, match="dtype"):
        verify_memory_bytes(cfg_of("llama3.1-8b"), dtype="int8")


def test_describe_names_every_term_on_one_line():
    line = describe(cfg_of("deepseek3-671b"))
    assert "\n" not in line
    for word in (
        "base 1.5 GiB",
        "layer (3 f32) x 583.5M",
        "experts 12 f32 x 44.0M",
        "globals (2 f32) x 7.2K",
        "row blocks 3 x 64.0 MiB",
        "activations 520 tok x 5 streams",
        "logits block",
        "(float32)",
    ):
        assert word in line, (word, line)
    assert "layer (3 f32 + 1 bf16) x 583.5M" in describe(cfg_of("deepseek3-671b"), dtype="bfloat16")
    total = verify_memory_bytes(cfg_of("deepseek3-671b")) / GiB
    assert line.startswith(f"verify peak ~{total:.1f} GiB")


def test_imports_no_heavy_library():
    code = (
        "import sys; import converters.verify.sizing\n"
        "heavy = [m for m in ('torch', 'jax', 'transformers', 'airflow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

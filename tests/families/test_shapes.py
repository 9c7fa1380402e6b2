"""Real-size models, shapes only: every MaxText model name plans exactly MaxText's tree (no weights)."""

from __future__ import annotations

import math

import pytest

from converters import registry

# Shapes from MaxText's layout for each model (scanned: layer axis at position 1).
EXPECTED = {
    "llama3.1-8b": {
        "token_embedder/embedding": (128256, 4096),
        "decoder/logits_dense/kernel": (4096, 128256),
        "decoder/layers/self_attention/query/kernel": (4096, 32, 32, 128),
        "decoder/layers/self_attention/key/kernel": (4096, 32, 8, 128),
        "decoder/layers/self_attention/out/kernel": (32, 32, 128, 4096),
        "decoder/layers/mlp/wi_0/kernel": (4096, 32, 14336),
        "decoder/layers/mlp/wo/kernel": (14336, 32, 4096),
        "decoder/layers/pre_self_attention_layer_norm/scale": (4096, 32),
    },
    "qwen2.5-7b": {
        "token_embedder/embedding": (152064, 3584),
        "decoder/logits_dense/kernel": (3584, 152064),
        "decoder/layers/self_attention/query/kernel": (3584, 28, 28, 128),
        "decoder/layers/self_attention/query/bias": (28, 28, 128),
        "decoder/layers/self_attention/key/bias": (4, 28, 128),
        "decoder/layers/self_attention/out/kernel": (28, 28, 128, 3584),
        "decoder/layers/mlp/wi_1/kernel": (3584, 28, 18944),
    },
    "qwen3-8b": {
        "decoder/layers/self_attention/query/kernel": (4096, 36, 32, 128),
        "decoder/layers/self_attention/query_norm/scale": (128, 36),
        "decoder/logits_dense/kernel": (4096, 151936),
    },
    "qwen3-0.6b": {
        "decoder/layers/self_attention/query/kernel": (1024, 28, 16, 128),
        "decoder/layers/self_attention/out/kernel": (16, 28, 128, 1024),
    },
}
PARAMS_B = {"llama3.1-8b": 8.03, "llama3.1-70b": 70.55, "llama3.1-405b": 405.85, "qwen2.5-1.5b": 1.54, "qwen2.5-7b": 7.62,
            "qwen2.5-14b": 14.77, "qwen3-0.6b": 0.60, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02, "qwen3-8b": 8.19,
            "qwen3-14b": 14.77, "qwen3-32b": 32.76}
TIED = {"qwen2.5-1.5b", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b"}


@pytest.mark.parametrize("name", registry.model_names())
def test_real_size_plan(name):
    family, cfg = registry.model(name)
    scanned = {l.path: l.shape for l in family.plan(cfg, True)}
    unscanned = {l.path: l.shape for l in family.plan(cfg, False)}
    for path, shape in EXPECTED.get(name, {}).items():
        assert scanned[path] == shape, path
    assert ("decoder/logits_dense/kernel" in scanned) == (name not in TIED)
    assert sum(map(math.prod, scanned.values())) == sum(map(math.prod, unscanned.values()))
    assert round(sum(map(math.prod, scanned.values())) / 1e9, 2) == PARAMS_B[name]
    L = cfg["num_hidden_layers"]
    assert f"decoder/layers_{L - 1}/mlp/wo/kernel" in unscanned and not any(p.startswith("decoder/layers/") for p in unscanned)
    # every unscanned layer leaf is the scanned leaf with the layer axis removed
    for path, shape in unscanned.items():
        if path.startswith("decoder/layers_0/"):
            s = scanned[path.replace("layers_0", "layers")]
            assert s[:1] + s[2:] == shape


def test_instruct_names_map_to_base_architecture():
    assert registry.model("llama3.1-8b-Instruct")[0].name == "llama3.1"


def test_unknown_model_lists_supported():
    with pytest.raises(registry.UnsupportedModelError, match="llama3.1-8b"):
        registry.model("gpt2")

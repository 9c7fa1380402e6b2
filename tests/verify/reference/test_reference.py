"""The JAX reference against the transformers models, with an independent HF -> MaxText mapping.

These tests do not use the converter: they lay out HF weights the way MaxText stores them (the
contract in the dense-format reference, section 2) with a few lines of numpy, so the reference's
semantics are checked against HF directly. All weights are float32, so the only differences left are
accumulation order: KL stays below 1e-9.
"""

from __future__ import annotations

import numpy as np
import pytest

from converters.core import registry
from converters.errors import CkptflowError, UnsupportedModelError
from converters.verify.metrics import kl_per_token
from converters.verify.reference import ReferenceModel, forward_for
from converters.verify.reference.qwen import Qwen3Forward
from tests.families.helpers import attention_kernels, mlp_kernels, qk_norms

EXACT_KL = 1e-9

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _interleave(a: np.ndarray) -> np.ndarray:
    h = a.shape[-1] // 2
    out = np.empty_like(a)
    out[..., 0::2], out[..., 1::2] = a[..., :h], a[..., h:]
    return out


def to_maxtext(model, scan: bool) -> dict:
    """HF state dict -> MaxText arrays ('/'-joined keys under params/params)."""
    cfg = model.config
    e, n, k = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or e // n
    sd = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    out = {
        "token_embedder/embedding": sd["model.embed_tokens.weight"],
        "decoder/decoder_norm/scale": sd["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        out["decoder/logits_dense/kernel"] = sd["lm_head.weight"].T
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        lay = {
            "pre_self_attention_layer_norm/scale": sd[p + "input_layernorm.weight"],
            "post_self_attention_layer_norm/scale": sd[p + "post_attention_layernorm.weight"],
            **attention_kernels(sd, p + "self_attn.", e, n, k, d),
            **mlp_kernels(sd, p + "mlp."),
        }
        if cfg.model_type == "llama":  # interleaved RoPE layout, 1/sqrt(D) baked into the query
            lay["self_attention/query/kernel"] = _interleave(lay["self_attention/query/kernel"]) / np.sqrt(d)
            lay["self_attention/key/kernel"] = _interleave(lay["self_attention/key/kernel"])
        if cfg.model_type == "qwen2":
            for mt, hf in (("query", "q"), ("key", "k"), ("value", "v")):
                lay[f"self_attention/{mt}/bias"] = sd[p + f"self_attn.{hf}_proj.bias"].reshape(-1, d)
        if cfg.model_type == "qwen3":
            lay |= qk_norms(sd, p + "self_attn.")
        layers.append(lay)
    if scan:
        for key in layers[0]:
            out[f"decoder/layers/{key}"] = np.stack([lay[key] for lay in layers], axis=1)
    else:
        for i, lay in enumerate(layers):
            out.update({f"decoder/layers_{i}/{key}": v for key, v in lay.items()})
    return out


def make_model(model_type: str, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
    )
    kw.update(overrides)
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)
    return model


def hf_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


VARIANTS = {
    "llama3-rope-untied": ("llama", dict(head_dim=16, rope_parameters=LLAMA3_ROPE, max_position_embeddings=131072)),
    "llama-plain-rope-tied": (
        "llama",
        dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    ),
    "qwen2-untied": ("qwen2", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-tied": (
        "qwen3",
        dict(head_dim=16, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
}


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_reference_matches_transformers(variant, scan):
    model_type, overrides = VARIANTS[variant]
    model = make_model(model_type, **overrides)
    ids = [int(i) for i in np.random.default_rng(3).integers(0, 300, size=300)]
    ref = ReferenceModel(to_maxtext(model, scan), model.config.to_dict())
    assert ref.scanned == scan
    mt = ref.logits(ids)
    assert mt.dtype == np.float32 and mt.shape == (300, 300)
    hf = hf_logits(model, ids)
    assert float(np.std(hf)) > 0.5  # confident enough that mistakes would show
    assert kl_per_token(hf, mt).max() < EXACT_KL


def test_bfloat16_runs_in_bfloat16():
    model = make_model("qwen3", head_dim=16)
    ids = list(range(1, 60))
    params = to_maxtext(model, True)
    f32 = ReferenceModel(params, model.config.to_dict()).logits(ids)
    bf16 = ReferenceModel(params, model.config.to_dict(), dtype="bfloat16").logits(ids)
    kl = kl_per_token(f32, bf16).max()
    assert bf16.dtype == np.float32 and 1e-7 < kl < 1e-2


def test_maxtext_bf16_tied_table_option():
    """MaxText's attend_on_embedding rounds a tied table to bf16 even in float32 runs; opt-in only."""
    model = make_model("qwen2", tie_word_embeddings=True)
    ids = list(range(1, 40))
    params = to_maxtext(model, True)
    plain = ReferenceModel(params, model.config.to_dict()).logits(ids)
    maxtext_exact = ReferenceModel(params, model.config.to_dict(), bf16_tied_logits=True).logits(ids)
    hf = hf_logits(model, ids)
    assert kl_per_token(hf, plain).max() < EXACT_KL
    assert kl_per_token(hf, maxtext_exact).max() > 10 * kl_per_token(hf, plain).max()


def test_rope_layouts_are_the_same_rotation_up_to_the_permutation():
    """Interleaved RoPE on permuted dims == half-split RoPE, permuted: why the converter permutes q/k."""
    import jax.numpy as jnp

    from converters.verify.reference.common import rope_halves
    from converters.verify.reference.llama import rope_interleaved

    x = np.random.default_rng(0).normal(size=(50, 3, 16)).astype(np.float32)
    pos = jnp.arange(50)
    a = np.asarray(rope_interleaved(jnp.asarray(_interleave(x)), pos, 10000.0, None, jnp.float32))
    b = _interleave(np.asarray(rope_halves(jnp.asarray(x), pos, 10000.0, jnp.float32)))
    np.testing.assert_allclose(a, b, atol=1e-5)
    # position 0 is the identity: short prompts cannot see a wrong layout there
    np.testing.assert_allclose(np.asarray(rope_halves(jnp.asarray(x), pos, 1e4, jnp.float32))[0], x[0], atol=1e-6)


def test_llama3_frequencies_match_transformers():
    import jax.numpy as jnp
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from converters.verify.reference.llama import llama3_scaled_inv_freq

    cfg = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        head_dim=128,
        max_position_embeddings=131072,
        rope_parameters=LLAMA3_ROPE,
    )
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    base = 1.0 / 500000.0 ** (np.arange(64, dtype=np.float32) * 2 / 128)
    ours = np.asarray(llama3_scaled_inv_freq(jnp.asarray(base), 8.0, 1.0, 4.0, 8192))
    np.testing.assert_allclose(ours, hf_inv.numpy(), rtol=1e-5)
    assert not np.allclose(ours, base)  # the scaling really changes the low frequencies


def test_registry_and_unsupported_configs():
    assert {"llama", "qwen2", "qwen3"} <= {t for f in registry.FAMILIES.values() for t in f.model_types}
    assert type(forward_for("qwen3")) is Qwen3Forward
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*supported: .*llama"):
        forward_for("gpt2")
    model = make_model("qwen3", head_dim=16)
    params = to_maxtext(model, True)
    cfg = model.config.to_dict()
    for change, match in [
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True, "sliding_window": 16}, "sliding"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ]:
        with pytest.raises(UnsupportedModelError, match=match):
            ReferenceModel(params, {**cfg, **change})
    with pytest.raises(UnsupportedModelError, match="model_type"):
        ReferenceModel(params, {**cfg, "model_type": "no-such-model"})


def test_llama3_constants_mismatch_is_a_warning():
    model = make_model(
        "llama", head_dim=16, rope_parameters={**LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072
    )
    ref = ReferenceModel(to_maxtext(model, True), model.config.to_dict())
    assert len(ref.warnings) == 1 and "factor=32.0" in ref.warnings[0]


def test_checkpoint_structure_errors():
    model = make_model("qwen2")
    cfg = model.config.to_dict()
    params = to_maxtext(model, True)
    with pytest.raises(CkptflowError, match="query/bias"):
        ReferenceModel({k: v for k, v in params.items() if not k.endswith("query/bias")}, cfg)
    two_layers = {k: v for k, v in cfg.items() if k != "layer_types"} | {"num_hidden_layers": 2}
    with pytest.raises(CkptflowError, match="layers on axis 1"):
        ReferenceModel(params, two_layers)
    with pytest.raises(CkptflowError, match="token_embedder/embedding has shape"):
        ReferenceModel({**params, "token_embedder/embedding": params["token_embedder/embedding"][:10]}, cfg)
    unscanned = to_maxtext(model, False)
    with pytest.raises(CkptflowError, match="more than the 2 layers"):
        ReferenceModel(unscanned, two_layers)
    with pytest.raises(CkptflowError, match="both scanned"):
        ReferenceModel({**params, **unscanned}, cfg)

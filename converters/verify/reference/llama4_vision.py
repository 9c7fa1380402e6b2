"""What Llama 4's vision tower and projector compute (transformers' Llama4VisionModel + Llama4MultiModalProjector;
MaxText 0.2.5 models/llama4.py `Llama4VisionModel` + `Llama4MultiModalProjector` match them to float32 rounding on
ckptflow's conversions: tests/families/test_llama4_vision.py), reading the arrays converters/families/llama4_vision.py
lays out under `vision_encoder/`. One image tile `[C, S, S]` at a time, float32 throughout.

  * unfold: p x p patches flattened (channel, patch row, patch column), row-major over the patch grid (torch
    `nn.Unfold`), times `vit_unfold_linear/kernel` (no bias); the class embedding appended after the patches;
    plus `positional_embedding_vlm`; `layernorm_pre`.
  * each `layers_<i>`: LayerNorm -> q/k/v (with biases) -> 2-D RoPE on adjacent pairs (2j, 2j+1): the first D/4 pairs
    turned by (column + 1) * f_j, the last D/4 by (row + 1) * f_j, f_j = theta^(-2j / (D/2)); the class token not
    turned -> softmax(q k^T / sqrt(D)) over all positions (no mask) -> out (with bias), residual; LayerNorm -> fc1 ->
    GELU (erf) -> fc2, residual.
  * `layernorm_post`, the class token dropped, pixel shuffle (ratio r: s x s patches -> (s r)^2 tokens of c / r^2
    features, HF `pixel_shuffle`), adapter fc1 -> GELU -> fc2 -> GELU (no biases); the projector (no bias).
LayerNorms take eps 1e-5 (HF's nn.LayerNorm default; MaxText's `normalization_layer_epsilon` is rms_norm_eps, 1e-5
for the published models: `config_warnings` says when they differ).

The multimodal model: the projected features replace the embeddings of the image tokens in order (HF
`masked_scatter` at `image_token_index`; MaxText merges at its processor's <|patch|> id 200092, the published
image_token_index); the language model then runs as on text (causal: MaxText's llama4 layers take no bidirectional
image mask, transformers' none either).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from converters.families.llama4_vision import ENCODER, MODEL, PROJECTOR

F32 = jnp.float32
LN_EPS = 1e-5
MAXTEXT_IMAGE_ID = 200092  # multimodal/processor_llama4.py LLAMA4_PATCH_TOKEN (<|patch|>)
ADAPTER = f"{MODEL}/Llama4VisionPixelShuffleMLP_0/pixel_shuffle_mlp/vit_pixel_shuffle_mlp_"
UNFOLD = f"{MODEL}/Llama4UnfoldConvolution_0/vit_unfold_linear/kernel"
PROJECTION = f"{PROJECTOR}/vit_multi_modal_projector/kernel"
LAYER_KEYS = (
    *(f"{n}/{w}" for n in ("input_layer_norm", "post_attention_layer_norm") for w in ("scale", "bias")),
    *(f"self_attention_vision/{k}/{w}" for k in ("query", "key", "value", "out") for w in ("kernel", "bias")),
    *(f"Llama4VisionMLP_0/vit_encoder_layer_mlp_{k}/{w}" for k in ("fc1", "fc2") for w in ("kernel", "bias")),
)


def global_keys(layers: int) -> tuple[str, ...]:
    keys = [
        UNFOLD,
        f"{MODEL}/class_embedding",
        f"{MODEL}/positional_embedding_vlm",
        *(f"{MODEL}/{n}/{w}" for n in ("layernorm_pre", "layernorm_post") for w in ("scale", "bias")),
        ADAPTER + "fc1/kernel",
        ADAPTER + "fc2/kernel",
        PROJECTION,
    ]
    return tuple(keys + [f"{ENCODER}/layers_{i}/{k}" for i in range(layers) for k in LAYER_KEYS])


def vision_spec(v) -> tuple:
    """(layers, heads, patch, image size, rope theta, pixel shuffle ratio) of a Llama4VisionConfig."""
    rp = getattr(v, "rope_parameters", None) or {}
    return (
        int(v.num_hidden_layers),
        int(v.num_attention_heads),
        int(v.patch_size),
        int(v.image_size),
        float(rp.get("rope_theta", getattr(v, "rope_theta", 10000.0))),
        float(v.pixel_shuffle_ratio),
    )


def unfold(pixels, patch: int):
    """`[C, S, S]` -> `[patches, C*p*p]` as torch nn.Unfold (channel, row, column within a patch; patches row-major)."""
    c, h, w = pixels.shape
    rows, cols = h // patch, w // patch
    x = pixels.reshape(c, rows, patch, cols, patch).transpose(1, 3, 0, 2, 4)
    return x.reshape(rows * cols, c * patch * patch)


def rope_angles(side: int, head_dim: int, theta: float):
    """`[side^2 + 1, head_dim / 2]`: the angle of each adjacent pair per position (the class token last, 0)."""
    quarter = head_dim // 4
    freq = 1.0 / (theta ** (jnp.arange(0, head_dim // 2, 2, dtype=F32)[:quarter] / (head_dim // 2)))
    idx = jnp.arange(side * side)
    x, y = (idx % side + 1).astype(F32), (idx // side + 1).astype(F32)
    angles = jnp.concatenate([x[:, None] * freq, y[:, None] * freq], axis=-1)
    return jnp.concatenate([angles, jnp.zeros((1, 2 * quarter), F32)])


def rope_pairs(x, angles):
    """x `[T, N, D]`: each pair (2j, 2j+1) turned by angles[:, j] (HF `vision_apply_rotary_emb`)."""
    t, n, d = x.shape
    pairs = x.reshape(t, n, d // 2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]
    return jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(t, n, d)


def layer_norm(x, scale, bias):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + LN_EPS) * scale + bias


def gelu(x):
    return jax.nn.gelu(x, approximate=False)


def pixel_shuffle(x, ratio: float):
    """HF `pixel_shuffle` on one tile's `[patches, c]`."""
    n, c = x.shape
    s = int(round(n**0.5))
    x = x.reshape(s, int(s * ratio), int(c / ratio)).transpose(1, 0, 2)
    x = x.reshape(int(s * ratio), int(s * ratio), int(c / ratio**2)).transpose(1, 0, 2)
    return x.reshape(-1, x.shape[-1])


def image_features(v: tuple, g: dict, pixels):
    """The adapter's output `[tokens, vision_output_dim]` of one tile `[C, S, S]` (HF `get_image_features`)."""
    layers, heads, patch, size, theta, ratio = v
    w = lambda key: g[key].astype(F32)  # noqa: E731
    x = unfold(pixels.astype(F32), patch) @ w(UNFOLD)
    x = jnp.concatenate([x, w(f"{MODEL}/class_embedding")[None]], axis=0)
    x = x + w(f"{MODEL}/positional_embedding_vlm")
    x = layer_norm(x, w(f"{MODEL}/layernorm_pre/scale"), w(f"{MODEL}/layernorm_pre/bias"))
    head_dim = x.shape[-1] // heads
    angles = rope_angles(size // patch, head_dim, theta)
    for i in range(layers):
        b = f"{ENCODER}/layers_{i}/"
        a = b + "self_attention_vision/"
        h = layer_norm(x, w(b + "input_layer_norm/scale"), w(b + "input_layer_norm/bias"))
        q, k, vv = (
            jnp.einsum("te,end->tnd", h, w(f"{a}{n}/kernel")) + w(f"{a}{n}/bias") for n in ("query", "key", "value")
        )
        q, k = rope_pairs(q, angles), rope_pairs(k, angles)
        att = jax.nn.softmax(jnp.einsum("tnd,snd->nts", q, k) * head_dim**-0.5, axis=-1)
        o = jnp.einsum("nts,snd->tnd", att, vv)
        x = x + jnp.einsum("tnd,nde->te", o, w(a + "out/kernel")) + w(a + "out/bias")
        m = b + "Llama4VisionMLP_0/vit_encoder_layer_mlp_"
        h = layer_norm(x, w(b + "post_attention_layer_norm/scale"), w(b + "post_attention_layer_norm/bias"))
        h = gelu(h @ w(m + "fc1/kernel") + w(m + "fc1/bias"))
        x = x + h @ w(m + "fc2/kernel") + w(m + "fc2/bias")
    x = layer_norm(x, w(f"{MODEL}/layernorm_post/scale"), w(f"{MODEL}/layernorm_post/bias"))[:-1]
    x = pixel_shuffle(x, ratio)
    return gelu(gelu(x @ w(ADAPTER + "fc1/kernel")) @ w(ADAPTER + "fc2/kernel"))


def projected(v: tuple, g: dict, pixels):
    """The image tokens `[tokens, text hidden]` of one tile: the features through the projector."""
    return image_features(v, g, pixels) @ g[PROJECTION].astype(F32)


@functools.lru_cache(maxsize=None)
def jitted(name: str = "projected"):
    return jax.jit(globals()[name], static_argnums=0)


def vision_tokens(v: tuple, g: dict, pixel_values: np.ndarray):
    """The image tokens of `pixel_values` `[tiles, C, S, S]`, tile after tile (HF's order)."""
    return jnp.concatenate([jitted()(v, g, jnp.asarray(t, F32)) for t in np.asarray(pixel_values, np.float32)])


def test_image(size: int) -> np.ndarray:
    """A deterministic picture `[3, S, S]` normalised as Llama 4's processor does ((x - 0.5) / 0.5): gradients, a
    disc, a checkerboard."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    disc = ((x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.06).astype(np.float32)
    checker = ((np.floor(x * 7) + np.floor(y * 5)) % 2).astype(np.float32)
    return (np.stack([x, y, 0.6 * disc + 0.4 * checker]) - 0.5) / 0.5


class Llama4VisionMixin:
    """The image prompt of a multimodal (`llama4`) config, for Llama4Forward (which adds `vision_options` to its spec
    and `vision_keys` to its global keys)."""

    @staticmethod
    def vision_options(cfg) -> tuple:
        if getattr(cfg, "model_type", "") != "llama4" or getattr(cfg, "vision_config", None) is None:
            return ()
        return (("vision", vision_spec(cfg.vision_config)), ("image_token", int(cfg.image_token_index)))

    @staticmethod
    def vision_keys(spec) -> tuple[str, ...]:
        v = spec.option("vision")
        return () if v is None else global_keys(v[0])

    @staticmethod
    def vision_warnings(cfg) -> list[str]:
        if getattr(cfg, "model_type", "") != "llama4" or getattr(cfg, "vision_config", None) is None:
            return []
        out = []
        image = int(cfg.image_token_index)
        if image != MAXTEXT_IMAGE_ID:
            out.append(
                f"config image_token_index={image}: MaxText 0.2.5 places image tokens at id {MAXTEXT_IMAGE_ID} "
                "(processor_llama4.LLAMA4_PATCH_TOKEN), whatever the config says; the reference uses the config's"
            )
        eps = float(getattr(cfg.get_text_config(), "rms_norm_eps", LN_EPS))
        if eps != LN_EPS:
            out.append(
                f"text rms_norm_eps={eps:g}: MaxText's vision tower LayerNorms take it (normalization_layer_epsilon), "
                f"transformers' take {LN_EPS:g}; the reference follows transformers"
            )
        return out

    def image_prompt(self, config: dict, *, seed: int = 0, tokenizer=None):
        return image_prompt(config, seed=seed, tokenizer=tokenizer)

    def multimodal_embed(self, spec, g: dict, rows, index, token_ids: np.ndarray, inputs: dict):
        """The prompt's embeddings with the image tokens' replaced by the projected image features, in order."""
        from converters.errors import CkptflowError

        v = spec.option("vision")
        if v is None:
            raise CkptflowError("a prompt with an image needs a multimodal llama4 config and its vision tower")
        tokens = vision_tokens(v, g, inputs["pixel_values"])
        at = np.flatnonzero(np.asarray(token_ids) == spec.option("image_token"))
        if at.size != tokens.shape[0]:
            raise CkptflowError(f"the prompt has {at.size} image tokens; its image gives {tokens.shape[0]}")
        x = self.embed(spec, rows, index)
        return x.at[jnp.asarray(at)].set(tokens.astype(spec.jdtype)), {}


def image_prompt(config: dict, *, seed: int = 0, tokenizer=None):
    """For a multimodal Llama 4 config: (token ids, transformers' inputs) of a prompt holding one generated image of
    one tile (`image_size` square), laid out as Llama 4's processor does for a single tile: BOS, text,
    <|image_start|>, <|image|> (when the tokenizer knows it), the tile's <|patch|> tokens (image_token_index, one
    per projected feature: (S / p)^2 * r^2), <|image_end|>, text. None for configs without a tower."""
    if config.get("model_type") != "llama4" or not config.get("vision_config"):
        return None
    from converters.verify.reference.common import hf_config_object

    cfg = hf_config_object(config)
    t, v = cfg.get_text_config(), cfg.vision_config
    image, boi, eoi = int(cfg.image_token_index), int(cfg.boi_token_index), int(cfg.eoi_token_index)
    _, _, patch, size, _, ratio = vision_spec(v)
    n = int(round((size // patch) ** 2 * ratio * ratio))
    rng = np.random.default_rng(seed + 7919)
    marker = []
    if tokenizer is not None:
        i = tokenizer.convert_tokens_to_ids("<|image|>")
        marker = [int(i)] if isinstance(i, int) and i != getattr(tokenizer, "unk_token_id", None) else []
    special = {image, boi, eoi, *marker}

    def text(count: int, words: str) -> list[int]:
        if tokenizer is not None:
            return [int(i) for i in tokenizer(words, add_special_tokens=False)["input_ids"]]
        return [int(i) for i in rng.integers(0, int(t.vocab_size), size=count) if int(i) not in special]

    bos = getattr(t, "bos_token_id", None)
    ids = ([int(bos)] if bos is not None else []) + text(12, "Here is a picture:")
    ids += [boi, *marker] + [image] * n + [eoi]
    ids += text(40, " Describe what it shows, colour by colour, and say where the round shape is. It shows")
    return ids, {"pixel_values": test_image(size)[None].astype(np.float32)}

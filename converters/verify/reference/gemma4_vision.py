"""What MaxText 0.2.5 computes for Gemma 4's vision tower and projector (models/gemma4_vision.py
`Gemma4VisionEncoderLayer` + `Gemma4VisionProjector`), reading the arrays converters/families/gemma4_vision.py lays
out under `vision_encoder/`. One image at a time, float32 throughout (the tower computes in `dtype_mm: float32`).

  * `VisionEntry`: the image `[H, W, C]` in [0, 1] cut into p x p patches flattened (row, column, channel), row-major
    over the patch grid; positions (x, y) = (column, row) of the patch. 2 (x - 0.5), projected without bias, plus
    `pos_emb_param[x, 0] + pos_emb_param[y, 1]`.
  * each `layer_<i>`: RMSNorm -> attention -> RMSNorm, residual; RMSNorm -> GELU(tanh)-gated MLP -> RMSNorm, residual.
    Attention over all patches (no mask): q/k RMSNorm with scale, v RMSNorm without, then 2-D RoPE -- the first half
    of each head rotated by x, the second by y, each half split in halves again (rotate_half), timescale
    theta^(2i / (head_dim / 2)) -- and no query scaling (`query_pre_attn_scalar=1.0`, qk-norm: no 1/sqrt(d)).
  * `VisionExit`: average pool k x k patches (k^2 = patches / soft tokens) in position order (token index
    x // k + (columns / k) * (y // k)), times sqrt(hidden); then `(x - std_bias) * std_scale`.
  * `Gemma4VisionProjector`: scale-free RMSNorm (eps `normalization_layer_epsilon`), then `projection`.

transformers' Gemma4VisionModel + Gemma4MultimodalEmbedder compute the same (rms_norm_eps = 1e-6 = MaxText's
epsilon for the published models).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from converters.families.gemma4_vision import ENCODER, PROJECTOR
from converters.verify.reference.common import dense, rms_norm

F32 = jnp.float32


def patchify(pixels: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(patches `[n, p*p*C]`, positions `[n, 2]` as (x, y)) of an image `[H, W, C]` (MaxText `patchify`)."""
    h, w, c = pixels.shape
    rows, cols = h // patch, w // patch
    patches = pixels.reshape(rows, patch, cols, patch, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
    y, x = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return patches, np.stack([x, y], -1).reshape(-1, 2)


def global_keys(layers: int) -> tuple[str, ...]:
    keys = [
        f"{ENCODER}/vision_entry/input_projection/kernel",
        f"{ENCODER}/vision_entry/pos_emb_param",
        f"{ENCODER}/std_bias",
        f"{ENCODER}/std_scale",
        f"{PROJECTOR}/projection/kernel",
    ]
    per_layer = (
        "pre_attention_norm/scale",
        "post_attention_norm/scale",
        "pre_ffw_norm/scale",
        "post_ffw_norm/scale",
        "attention/query_norm/scale",
        "attention/key_norm/scale",
        *(f"attention/{k}/kernel" for k in ("query", "key", "value", "out")),
        *(f"mlp/{k}/kernel" for k in ("wi_0", "wi_1", "wo")),
    )
    return tuple(keys + [f"{ENCODER}/layer_{i}/{k}" for i in range(layers) for k in per_layer])


def rope_2d(x, positions, theta: float):
    """x `[T, N, D]`, positions `[T, 2]`: the first D/2 channels rotated by x, the last D/2 by y (MaxText
    `apply_multidimensional_rope` with 2-D positions; HF `apply_multidimensional_rope`)."""
    parts = []
    d = x.shape[-1]
    per = 2 * (d // 4)
    for k in range(2):
        part = x[..., k * per : (k + 1) * per]
        half = per // 2
        timescale = theta ** (2 * jnp.arange(half, dtype=F32) / per)
        angle = positions[:, k].astype(F32)[:, None, None] / timescale
        sin, cos = jnp.sin(angle), jnp.cos(angle)
        x1, x2 = part[..., :half], part[..., half:]
        parts.append(jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1))
    return jnp.concatenate(parts + [x[..., 2 * per :]], axis=-1)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def vision_tokens(v: tuple, g: dict, patches, positions):
    """Soft tokens `[n / k^2, text hidden]` of one image given as MaxText's (patches, positions).
    v: (layers, hidden, heads, pooling k, rope theta, eps, columns)."""
    layers, hidden, heads, k, theta, eps, cols = v
    w = lambda key: g[key].astype(F32)  # noqa: E731
    x = dense(2 * (patches.astype(F32) - 0.5), w(f"{ENCODER}/vision_entry/input_projection/kernel"), F32)
    table = w(f"{ENCODER}/vision_entry/pos_emb_param")  # [positions, 2, hidden]
    x = x + table[positions[:, 0], 0] + table[positions[:, 1], 1]
    ones = jnp.ones((hidden // heads,), F32)
    for i in range(layers):
        b = f"{ENCODER}/layer_{i}/"
        h = rms_norm(x, w(b + "pre_attention_norm/scale"), eps, F32)
        q = rms_norm(dense(h, w(b + "attention/query/kernel"), F32), w(b + "attention/query_norm/scale"), eps, F32)
        kk = rms_norm(dense(h, w(b + "attention/key/kernel"), F32), w(b + "attention/key_norm/scale"), eps, F32)
        vv = rms_norm(dense(h, w(b + "attention/value/kernel"), F32), ones, eps, F32)
        q, kk = rope_2d(q, positions, theta), rope_2d(kk, positions, theta)
        att = jax.nn.softmax(jnp.einsum("tnd,snd->nts", q, kk), axis=-1)
        a = dense(jnp.einsum("nts,snd->tnd", att, vv), w(b + "attention/out/kernel"), F32, contract=2)
        x = x + rms_norm(a, w(b + "post_attention_norm/scale"), eps, F32)
        h = rms_norm(x, w(b + "pre_ffw_norm/scale"), eps, F32)
        m = dense(gelu_tanh(dense(h, w(b + "mlp/wi_0/kernel"), F32)) * dense(h, w(b + "mlp/wi_1/kernel"), F32),
                  w(b + "mlp/wo/kernel"), F32)  # fmt: skip
        x = x + rms_norm(m, w(b + "post_ffw_norm/scale"), eps, F32)
    n = x.shape[0] // (k * k)
    token = positions[:, 0] // k + (cols // k) * (positions[:, 1] // k)
    x = jax.nn.one_hot(token, n, dtype=F32).T @ x / (k * k)
    x = x * math.sqrt(hidden)
    x = (x - w(f"{ENCODER}/std_bias")) * w(f"{ENCODER}/std_scale")
    x = rms_norm(x, jnp.ones((hidden,), F32), eps, F32)
    return dense(x, w(f"{PROJECTOR}/projection/kernel"), F32)


@functools.lru_cache(maxsize=None)
def jitted():
    return jax.jit(vision_tokens, static_argnums=0)


def tokens(v: tuple, g: dict, pixels: np.ndarray, patch: int) -> jnp.ndarray:
    """Soft tokens of an image `[H, W, C]` in [0, 1]."""
    patches, positions = patchify(np.asarray(pixels, np.float32), patch)
    cols = pixels.shape[1] // patch
    return jitted()(v[:6] + (cols,), g, jnp.asarray(patches), jnp.asarray(positions))


def grid(soft_tokens: int, k: int) -> tuple[int, int]:
    """(rows, columns) of patches of a test image giving `soft_tokens` tokens: rows / k the largest divisor of
    soft_tokens not above its square root (280 -> 14 x 20 tokens -> 42 x 60 patches, MaxText's 672 x 960 image)."""
    r = max(d for d in range(1, math.isqrt(soft_tokens) + 1) if soft_tokens % d == 0)
    return r * k, soft_tokens // r * k


def test_image(rows: int, cols: int) -> np.ndarray:
    """A deterministic picture `[H, W, 3]` in [0, 1]: gradients, a disc, a checkerboard (every patch differs)."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y, x = y / max(1, rows - 1), x / max(1, cols - 1)
    disc = ((x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.06).astype(np.float32)
    checker = ((np.floor(x * 7) + np.floor(y * 5)) % 2).astype(np.float32)
    return np.stack([x, y, 0.6 * disc + 0.4 * checker], -1).astype(np.float32)


# ----------------------------------------------------------------------------- the multimodal model (model_type gemma4)

MAXTEXT_IMAGE_ID = 258880  # MaxText marks image tokens by this id (multimodal/processor_gemma4.py), not the config's
IMAGE_BLOCKS = "image_blocks"  # carried in a layer's arrays dict to `attend`, as Gemma4Forward's global marker is


def _forward_base():
    from converters.verify.reference.gemma4 import Gemma4Forward

    return Gemma4Forward


class Gemma4MultimodalForward(_forward_base()):
    """Gemma4Forward for `gemma4_text` and multimodal `gemma4` configs (text model + vision tower).

    What MaxText adds for a prompt with an image (layers/nnx_decoders.py, models/gemma4.py, layers/attention_op.py):
    the tower's soft tokens replace the image tokens' embeddings (`merge_mm_embeddings`, in order; not scaled by
    sqrt(hidden)), and on the local (sliding-window) layers only, image tokens of one contiguous run also attend to
    each other: mask = (causal AND window) OR same-image (`_make_bidirectional_block_mask`); global layers stay
    causal. transformers does the same with `use_bidirectional_attention: vision` and mm_token_type_ids, except that
    it applies the window after the OR (AND(window, OR(causal, image))): the two differ only for an image run longer
    than the window (280 soft tokens vs a window of 1024 for the published models: never).
    """

    def make_spec(self, cfg):
        if cfg.model_type != "gemma4":
            return super().make_spec(cfg)
        spec = super().make_spec(cfg.get_text_config())
        options = list(spec.options)
        v = getattr(cfg, "vision_config", None)
        if v is not None:
            from converters.verify.reference.common import require

            require(not getattr(v, "use_clipped_linears", False), "clipped linears in the vision tower")
            require(bool(getattr(v, "standardize", False)), "a vision tower without standardize")
            require(
                getattr(v, "hidden_activation", "gelu_pytorch_tanh") in ("gelu_pytorch_tanh", "gelu_tanh"),
                f"vision hidden_activation={getattr(v, 'hidden_activation', None)!r}",
            )
            rp = dict(getattr(v, "rope_parameters", None) or {})
            vision = (
                int(v.num_hidden_layers),
                int(v.hidden_size),
                int(v.num_attention_heads),
                int(v.pooling_kernel_size),
                float(rp.get("rope_theta", 100.0)),
                float(v.rms_norm_eps),
            )
            soft = int(getattr(cfg, "vision_soft_tokens_per_image", None) or v.default_output_length)
            options += [
                ("vision", vision),
                ("vision_patch", int(v.patch_size)),
                ("image_token", int(cfg.image_token_id)),
                ("soft_tokens", soft),
            ]
        return dataclasses.replace(spec, model_type="gemma4", options=tuple(sorted(options)))

    def config_warnings(self, cfg) -> list[str]:
        out = super().config_warnings(cfg)
        image = getattr(cfg, "image_token_id", None) if cfg.model_type == "gemma4" else None
        if getattr(cfg, "vision_config", None) is not None and image is not None and int(image) != MAXTEXT_IMAGE_ID:
            out.append(
                f"config image_token_id={image}: MaxText 0.2.5 places image soft tokens at id {MAXTEXT_IMAGE_ID} "
                "(processor_gemma4.GEMMA4_TOKEN_PLACEHOLDER), whatever the config says; the reference uses the config's"
            )
        return out

    def global_keys(self, spec):
        keys = super().global_keys(spec)
        v = spec.option("vision")
        return keys if v is None else (*keys, *global_keys(v[0]))

    def image_prompt(self, config: dict, *, seed: int = 0, tokenizer=None):
        return image_prompt(config, seed=seed, tokenizer=tokenizer)

    def placeholder_ids(self, config: dict) -> tuple[int, ...]:
        """The image / video / audio placeholder ids of a multimodal config: transformers' Gemma4Model embeds them
        as the pad token in a text prompt (`get_placeholder_mask`), MaxText as themselves."""
        if config.get("model_type") != "gemma4":
            return ()
        keys = ("image_token_id", "video_token_id", "audio_token_id")
        return tuple(int(config[k]) for k in keys if config.get(k) is not None)

    def multimodal_embed(self, spec, g: dict, rows, index, token_ids: np.ndarray, inputs: dict):
        """The prompt's embeddings with the image tokens replaced by the tower's soft tokens, and the image runs that
        attend to each other on local layers (`block`'s `image_blocks`). inputs: transformers' `pixel_values`
        `[images, patches, p*p*3]` and `image_position_ids` `[images, patches, 2]` (MaxText's patches and positions)."""
        from converters.errors import CkptflowError
        from converters.verify.reference.gemma import image_blocks

        v = spec.option("vision")
        if v is None:
            raise CkptflowError("a prompt with an image needs a multimodal gemma4 config and its vision tower")
        patches = np.asarray(inputs["pixel_values"], np.float32)
        positions = np.asarray(inputs["image_position_ids"], np.int32)
        image = spec.option("image_token")
        at = np.flatnonzero(np.asarray(token_ids) == image)
        soft = [
            jitted()(v + (int(pos[:, 0].max()) + 1,), g, jnp.asarray(pt), jnp.asarray(pos))
            for pt, pos in zip(patches, positions)
        ]
        soft = jnp.concatenate(soft)
        if at.size != soft.shape[0]:
            raise CkptflowError(f"the prompt has {at.size} image tokens; its image(s) give {soft.shape[0]} soft tokens")
        x = self.embed(spec, rows, index)
        x = x.at[jnp.asarray(at)].set(soft.astype(spec.jdtype))
        return x, {IMAGE_BLOCKS: jnp.asarray(image_blocks(token_ids, image))}

    def attend(self, spec, p: dict, x, positions):
        """Gemma4Forward.attend (MoE layers reach it through `pre_moe`), with same-image attention on local layers
        when the prompt holds an image (p[IMAGE_BLOCKS]: the image run of each position, 0 for text)."""
        return super().attend(spec, p, x, positions, image_blocks=p.get(IMAGE_BLOCKS))

    def block(self, spec, p: dict, x, positions, image_blocks=None):
        return super().block(spec, with_image(p, image_blocks), x, positions)

    def pre_moe(self, spec, p: dict, x, positions, image_blocks=None):
        return super().pre_moe(spec, with_image(p, image_blocks), x, positions)


def with_image(p: dict, image_blocks) -> dict:
    """A layer's arrays with the prompt's image runs, read by `attend`."""
    return p if image_blocks is None else {**p, IMAGE_BLOCKS: image_blocks}


def image_prompt(config: dict, *, seed: int = 0, tokenizer=None):
    """For a multimodal Gemma 4 config: (token ids, transformers' model inputs) of a prompt holding one generated
    image of `vision_soft_tokens_per_image` soft tokens (published: 42 x 60 patches, MaxText's 672 x 960 image).
    Layout: BOS, text, <boi>, the image tokens, <eoi>, text. `mm_token_type_ids` marks the image tokens (HF's
    bidirectional attention among them). None for configs without a tower."""
    if config.get("model_type") != "gemma4" or not config.get("vision_config"):
        return None
    from converters.verify.reference.common import hf_config_object

    cfg = hf_config_object(config)
    t, v = cfg.get_text_config(), cfg.vision_config
    image, boi, eoi = int(cfg.image_token_id), int(cfg.boi_token_id), int(cfg.eoi_token_id)
    k, p = int(v.pooling_kernel_size), int(v.patch_size)
    soft = int(getattr(cfg, "vision_soft_tokens_per_image", None) or v.default_output_length)
    rows, cols = grid(soft, k)
    patches, positions = patchify(test_image(rows * p, cols * p), p)
    rng = np.random.default_rng(seed + 7919)
    special = {image, boi, eoi, *(int(getattr(cfg, n, -1) or -1) for n in ("video_token_id", "audio_token_id"))}

    def text(n: int, words: str) -> list[int]:
        if tokenizer is not None:
            return [int(i) for i in tokenizer(words, add_special_tokens=False)["input_ids"]]
        return [int(i) for i in rng.integers(0, int(t.vocab_size), size=n) if int(i) not in special]

    bos = getattr(t, "bos_token_id", None)
    ids = ([int(bos)] if bos is not None else []) + text(12, "Here is a picture:")
    ids += [boi] + [image] * soft + [eoi]
    ids += text(48, " Describe what it shows, colour by colour, and say where the round shape is. It shows")
    types = [1 if i == image else 0 for i in ids]
    return ids, {
        "pixel_values": patches[None].astype(np.float32),
        "image_position_ids": positions[None].astype(np.int64),
        "mm_token_type_ids": np.asarray([types], np.int64),
    }

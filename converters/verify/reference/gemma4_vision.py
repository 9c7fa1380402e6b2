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

"""Numerics shared by the MoE reference families: MaxText's routed MoE, attention with sinks and a sliding
window, YaRN rotary embedding.

Routed MoE (`src/maxtext/layers/moe.py`, `RoutedMoE`): the router (`GateLogit`) computes logits in the
compute dtype (`float32_gate_logits: false`), adds its bias if any, takes the top-k logits and softmaxes them
in float32 (cast back to the compute dtype), renormalises when `norm_topk_prob` is set, and scatters the
weights into a `[T, E]` matrix that is zero for unselected experts (`router_weights`). Each expert runs on
the tokens routed to it (biases added right after each matmul) and the outputs are summed with the weights in
float32 (`float32_weight_sum: true`): `converters.verify.reference.Reference` streams the experts one at a
time; with no capacity limit (`capacity_factor: -1`) that is what MaxText's dense and sparse paths compute.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from converters.verify.reference.common import MASK_VALUE, dense

GPT_OSS_ALPHA = 1.702  # MaxText moe.py: hard-coded in the GPT_OSS activation


def clipped_swiglu(limit: float) -> Callable:
    """GPT-OSS (`apply_ffn_activation`): gate clipped above at `limit`, up clipped to +-limit,
    gate * sigmoid(1.702 * gate) * (up + 1)."""

    def act(w0, w1):
        w0 = jnp.clip(w0, None, limit)
        w1 = jnp.clip(w1, -limit, limit)
        return w0 * jax.nn.sigmoid(w0 * GPT_OSS_ALPHA) * (w1 + 1)

    return act


def router_weights(x, kernel, dtype, *, top_k: int, norm_topk_prob: bool = False, bias=None):
    """`[T, E]` routing weights in `dtype`: softmax over the top-k (biased) logits, zero elsewhere."""
    logits = dense(x, kernel, dtype, bias=bias)  # GateLogit: inputs and kernel in the compute dtype
    top_w, top_i = jax.lax.top_k(logits, top_k)
    top_w = jax.nn.softmax(top_w.astype(jnp.float32), axis=-1).astype(dtype)
    if norm_topk_prob:
        top_w = top_w / top_w.sum(axis=-1, keepdims=True)
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.zeros((x.shape[0], kernel.shape[-1]), dtype).at[rows, top_i].set(top_w)


def attention(q, k, v, dtype, *, window: int | None = None, sinks=None):
    """Causal grouped-query attention, optionally cut to a sliding window and with per-head sink logits.

    q: [T, N, D] (already scaled), k, v: [S, K, D]. Key j is visible from query i iff j <= i and, with a
    window, i - window < j (MaxText and HF agree). Sinks (`[N]`, one logit per query head, GPT-OSS) join
    the softmax as an extra column that is dropped afterwards: they only take probability mass.
    """
    t, n, d = q.shape
    kv = k.shape[1]
    g = n // kv
    scores = jnp.einsum("tkgd,skd->kgts", q.reshape(t, kv, g, d), k).astype(jnp.float32)
    qi = jnp.arange(t)[:, None]
    kj = jnp.arange(k.shape[0])[None, :]
    mask = kj <= qi
    if window:
        mask = mask & (kj > qi - window)
    scores = jnp.where(mask[None, None], scores, MASK_VALUE)
    if sinks is not None:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(kv, g, 1, 1), (kv, g, t, 1))
        weights = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
    else:
        weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("kgts,skd->tkgd", weights.astype(dtype), v.astype(dtype))
    return out.reshape(t, n, d).astype(dtype)


def yarn_inv_freq(
    dim: int, theta: float, factor: float, beta_fast: float, beta_slow: float, original_max: int, truncate: bool
):
    """MaxText `YarnRotaryEmbedding.freqs_cis` frequencies (= HF `_compute_yarn_parameters`)."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    half = dim // 2
    freqs = 1.0 / (theta ** (2.0 * jnp.arange(half, dtype=jnp.float32) / dim))
    ramp = jnp.clip((jnp.arange(half, dtype=jnp.float32) - low) / (high - low), 0, 1)
    smooth = 1 - ramp
    return freqs / factor * (1 - smooth) + freqs * smooth


def yarn_rope(x, positions, inv_freq, scaling: float, dtype):
    """Half-split rotation (`rope_interleave: false`) by YaRN frequencies, output times `scaling`
    (`rope_attention_scaling`: 0.1 ln(factor) + 1), computed in float32 and cast to `dtype`. x: [T, H, D]."""
    angle = positions.astype(jnp.float32)[:, None, None] * inv_freq  # [T, 1, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1) * scaling
    return out.astype(dtype)

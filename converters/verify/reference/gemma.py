"""Gemma2 (HF `gemma2`, MaxText block `gemma2`) and Gemma3 (HF `gemma3` / `gemma3_text`, block `gemma3`).

What MaxText computes (src/maxtext/models/gemma2.py, gemma3.py, layers/attentions.py, attention_op.py,
embeddings.py, decoders.py), for a checkpoint laid out by the converter:

  * embedding: the table already holds sqrt(hidden) (Gemma2: float32 sqrt; Gemma3: bf16-rounded), rows
    gathered in the compute dtype; the tied output divides the logits by the exact sqrt(hidden) again
    (`normalize_embedding_logits`), then (Gemma2) `final_logits_soft_cap`: cap * tanh(logits / cap);
  * every RMSNorm multiplies by the stored scale (the converter stored HF's `1 + w`);
  * a layer: pre-norm -> attention -> post-attention norm -> residual; pre-ffw norm -> GELU(tanh)-gated MLP
    -> post-ffw norm -> residual;
  * Gemma2: one stored layer is a (local, global) pair of HF layers, `*_local` / `*_global`. Half-split RoPE
    (theta from the config), **no** runtime query scaling (1/sqrt(query_pre_attn_scalar) is in the kernel),
    attention logits soft-capped (`attn_logits_soft_cap`), the local half masked to a sliding window; the
    global half computes q.k in float32 (`float32_qk_product=True` in MaxText's gemma2 block);
  * Gemma3: per-head RMSNorm on q and k (before RoPE), RoPE with theta 10k on local layers and 1M with
    linear scaling (positions / factor) on global ones, query multiplied at run time by
    query_pre_attn_scalar**-0.5 (MaxText: head_dim**-0.5 for 4b/12b, (hidden/heads)**-0.5 for 27b -- the
    values HF's configs carry), sliding window on local layers, no soft-caps. Layer l is global iff
    (l + 1) % 6 == 0. Layers are stored in 6-layer scanned blocks plus an unscanned remainder, or
    unscanned `layers_<l>`;
  * Gemma3 multimodal: the SigLIP tower (float32, `dtype_mm`): patch conv + learned positions, pre-LN
    blocks with biased q/k/v/out and bidirectional attention scaled by head_dim**-0.5, GELU(tanh) MLP, final
    LayerNorm; average-pooled to `mm_tokens_per_image` tokens, RMSNorm (stored scale) and projected to
    hidden. The projected tokens replace the image-token embeddings, and image tokens attend to each
    other bidirectionally within their image (MaxText's `bidirectional_mask`).

Sliding window: key j is visible from query i iff i - window < j <= i (MaxText and HF agree).

Local vs global attention of a Gemma3 layer is static: `layer_params` adds a zero-size marker array
under `GLOBAL_MARKER` to global layers, so the key set (part of the jit-static pytree structure) selects
the variant and one block compiles twice rather than branching on traced values.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from converters.errors import CkptflowError
from converters.families.gemma import GEMMA3_PATTERN, PROJECTOR, gemma3_layer_location, gemma3_layer_types
from converters.families.gemma import VISION_ENCODER as VISION
from converters.verify.reference.common import (
    MASK_VALUE,
    Forward,
    Layout,
    ModelSpec,
    dense,
    gated_mlp,
    require,
    rms_norm,
)

GLOBAL_MARKER = "global_attention"

gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)  # MaxText "gelu" (flax default approximate=True)


def _norm_keys(suffix: str = "") -> tuple[str, ...]:
    return (
        f"pre_self_attention_norm{suffix}/scale",
        f"post_self_attention_norm{suffix}/scale",
        f"pre_ffw_norm{suffix}/scale",
        f"post_ffw_norm{suffix}/scale",
    )


def _attn_keys(att: str = "self_attention") -> tuple[str, ...]:
    return tuple(f"{att}/{m}/kernel" for m in ("query", "key", "value", "out"))


def _mlp_keys(mlp: str = "mlp") -> tuple[str, ...]:
    return tuple(f"{mlp}/{m}/kernel" for m in ("wi_0", "wi_1", "wo"))


def rope(x, positions, theta: float, dtype, factor: float = 1.0):
    """MaxText `RotaryEmbedding`: half-split pairs (i, i + D/2), timescale theta^(2i/D) * factor.

    sin/cos are computed in float32 and cast to the input dtype (as MaxText does). x: [T, H, D].
    """
    d = x.shape[-1]
    timescale = theta ** (2 * jnp.arange(d // 2, dtype=jnp.float32) / d)
    if factor != 1.0:
        timescale = timescale * factor
    angle = positions.astype(jnp.float32)[:, None, None] / timescale
    sin = jnp.sin(angle).astype(x.dtype)
    cos = jnp.cos(angle).astype(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(dtype)


def attention_mask(t: int, window: int | None = None, image_blocks=None):
    """[T, T] bool: causal, cut to the sliding window, OR'ed with same-image blocks (MaxText's order)."""
    q = jnp.arange(t)[:, None]
    k = jnp.arange(t)[None, :]
    mask = k <= q
    if window:
        mask = mask & (k > q - window)
    if image_blocks is not None:  # [T] int: 0 for text, n > 0 for the n-th contiguous run of image tokens
        mask = mask | ((image_blocks[:, None] == image_blocks[None, :]) & (image_blocks[:, None] > 0))
    return mask


def gemma_attention(q, k, v, dtype, *, window=None, softcap=None, qk_f32=False, image_blocks=None):
    """Grouped-query attention as MaxText's `apply_attention_dot`: q.k (float32 when `qk_f32`), soft cap,
    mask, float32 softmax, weights cast back to `dtype`. q: [T, N, D] (already scaled); k, v: [T, K, D]."""
    t, n, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(t, kv, n // kv, d)
    if qk_f32:
        qg, k = qg.astype(jnp.float32), k.astype(jnp.float32)
    scores = jnp.einsum("tkgd,skd->kgts", qg, k)
    if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
    scores = scores.astype(jnp.float32)
    scores = jnp.where(attention_mask(t, window, image_blocks)[None, None], scores, MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("kgts,skd->tkgd", weights, v.astype(dtype))
    return out.reshape(t, n, d).astype(dtype)


def image_blocks(token_ids: np.ndarray, image_token: int) -> np.ndarray:
    """Number contiguous runs of image tokens 1, 2, ...; text positions 0 (MaxText `_make_block_mask_indices`)."""
    is_img = np.asarray(token_ids) == image_token
    start = is_img & ~np.concatenate([[False], is_img[:-1]])
    return np.where(is_img, np.cumsum(start), 0).astype(np.int32)


class _GemmaBase(Forward):
    """Tied embedding normalized by sqrt(hidden), optional final soft-cap; padded vocab rows allowed."""

    def global_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return ("token_embedder/embedding", "decoder/decoder_norm/scale")

    def logits_block(self, spec: ModelSpec, y, w):
        dt = spec.jdtype
        w = w.astype(jnp.bfloat16 if spec.option("bf16_tied_logits", False) else dt)  # MaxText's bf16 cast: common.py
        logits = jnp.dot(y, w.T, preferred_element_type=dt)
        logits = logits / jnp.sqrt(y.shape[-1]).astype(dt)  # normalize_embedding_logits: the exact sqrt(E)
        cap = spec.option("final_softcap")
        if cap:
            logits = jnp.tanh(logits / cap) * cap
        return logits.astype(jnp.float32)

    def config_warnings(self, cfg) -> list[str]:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        act = getattr(text, "hidden_activation", None) or getattr(text, "hidden_act", None)
        if act not in (None, "gelu_pytorch_tanh", "gelu_tanh"):
            return [f"config hidden_activation={act!r}: MaxText computes the tanh-approximated GELU, HF will not"]
        return []


def _text_spec(cfg, **fields) -> dict:
    heads = int(cfg.num_attention_heads)
    out = dict(
        model_type=cfg.model_type,
        hidden_size=int(cfg.hidden_size),
        num_layers=int(cfg.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads),
        intermediate_size=int(cfg.intermediate_size),
        norm_eps=float(cfg.rms_norm_eps),
        tie_word_embeddings=True,
    )
    out.update(fields)
    return out


def _rope_of(params: dict | None, default_theta: float) -> tuple[float, float]:
    """(theta, linear factor) of one transformers rope-parameters entry."""
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    require(kind in ("default", "linear"), f"rope_type={kind!r} (MaxText's gemma blocks: default or linear)")
    return float(params.get("rope_theta", default_theta)), float(params.get("factor", 1.0)) if kind == "linear" else 1.0


# ------------------------------------------------------------------------------------------------ Gemma2


class Gemma2Forward(_GemmaBase):
    """Stored layer m = HF layers (2m local, 2m+1 global); `layout.num_layers` counts pairs."""

    def make_spec(self, cfg) -> ModelSpec:
        require(bool(getattr(cfg, "tie_word_embeddings", True)), "tie_word_embeddings=false")
        require(not getattr(cfg, "attention_bias", False), "attention_bias=true")
        n = int(cfg.num_hidden_layers)
        require(n % 2 == 0, f"num_hidden_layers={n} (MaxText stores (local, global) pairs)")
        types = list(getattr(cfg, "layer_types", None) or [])
        require(
            not types or types == ["sliding_attention", "full_attention"] * (n // 2),
            "layer_types other than local/global alternating",
        )
        rp = getattr(cfg, "rope_parameters", None) or {"rope_theta": getattr(cfg, "rope_theta", 10000.0)}
        theta, factor = _rope_of(rp, 10000.0)
        require(factor == 1.0, "rope scaling (MaxText's gemma2 block has none)")
        options = (
            ("attn_softcap", float(cfg.attn_logit_softcapping or 0.0)),
            ("final_softcap", float(cfg.final_logit_softcapping or 0.0)),
            ("sliding_window", int(cfg.sliding_window or 0)),
        )
        return ModelSpec(**_text_spec(cfg, vocab_size=int(cfg.vocab_size), rope_theta=theta), options=options)

    def detect_layout(self, spec: ModelSpec, keys) -> Layout:
        layout = super().detect_layout(spec, keys)
        return Layout(scanned=layout.scanned, num_layers=spec.num_layers // 2)

    def hf_layers(self, spec: ModelSpec, l: int) -> tuple[int, ...]:
        return (2 * l, 2 * l + 1)

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return tuple(
            k
            for half in ("local", "global")
            for k in (*_norm_keys(f"_{half}"), *_attn_keys(f"self_attention_{half}"), *_mlp_keys(f"mlp_{half}"))
        )

    def _sublayer(self, spec: ModelSpec, p: dict, x, positions, half: str):
        dt = spec.jdtype
        eps = spec.norm_eps
        att = f"self_attention_{half}"
        h = rms_norm(x, p[f"pre_self_attention_norm_{half}/scale"], eps, dt)
        q = dense(h, p[f"{att}/query/kernel"], dt)  # query_pre_attn_scalar**-0.5 is in the kernel
        k = dense(h, p[f"{att}/key/kernel"], dt)
        v = dense(h, p[f"{att}/value/kernel"], dt)
        q = rope(q, positions, spec.rope_theta, dt)
        k = rope(k, positions, spec.rope_theta, dt)
        local = half == "local"
        a = gemma_attention(
            q,
            k,
            v,
            dt,
            window=spec.option("sliding_window") if local else None,
            softcap=spec.option("attn_softcap"),
            qk_f32=not local,
        )
        a = dense(a, p[f"{att}/out/kernel"], dt, contract=2)
        x = x + rms_norm(a, p[f"post_self_attention_norm_{half}/scale"], eps, dt)
        h = rms_norm(x, p[f"pre_ffw_norm_{half}/scale"], eps, dt)
        m = gated_mlp(
            h, p[f"mlp_{half}/wi_0/kernel"], p[f"mlp_{half}/wi_1/kernel"], p[f"mlp_{half}/wo/kernel"], dt, gelu_tanh
        )
        return x + rms_norm(m, p[f"post_ffw_norm_{half}/scale"], eps, dt)

    def block(self, spec: ModelSpec, p: dict, x, positions):
        x = self._sublayer(spec, p, x, positions, "local")
        return self._sublayer(spec, p, x, positions, "global")


# ------------------------------------------------------------------------------------------------ Gemma3


def _vision_block_keys() -> tuple[str, ...]:
    a = "MultiHeadDotProductAttention_0"
    return (
        "LayerNorm_0/scale",
        "LayerNorm_0/bias",
        "LayerNorm_1/scale",
        "LayerNorm_1/bias",
        *(f"{a}/{m}/{w}" for m in ("query", "key", "value", "out") for w in ("kernel", "bias")),
        "MlpBlockViT_0/Dense_0/kernel",
        "MlpBlockViT_0/Dense_0/bias",
        "MlpBlockViT_0/Dense_1/kernel",
        "MlpBlockViT_0/Dense_1/bias",
    )


def layer_norm(x, scale, bias, eps: float):
    """flax LayerNorm in float32: (x - mean) * rsqrt(var + eps) * scale + bias."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class Gemma3Forward(_GemmaBase):
    """Text decoder (both model types) and, for `gemma3` configs, the vision tower and projector.

    `image_prompt` is the hook `converters.verify.run` uses to add a prompt holding an image to a verification
    run; `multimodal_embed` is that prompt's first stage (`converters.verify.reference.Reference.prompt`).
    """

    def image_prompt(self, config: dict, *, seed: int = 0, tokenizer=None):
        return gemma3_image_prompt(config, seed=seed, tokenizer=tokenizer)

    def multimodal_embed(self, spec: ModelSpec, g: dict, rows, index, token_ids: np.ndarray, inputs: dict):
        """A prompt holding images: text embeddings with the image tokens replaced by the projected soft tokens, and
        the image blocks that make those tokens attend to each other (`block`'s `image_blocks`)."""
        if spec.option("vision") is None:
            raise CkptflowError(
                "a prompt with an image needs a multimodal gemma3 config (model_type 'gemma3') and its vision tower"
            )
        images = np.asarray(inputs["pixel_values"], np.float32)
        images = images[None] if images.ndim == 3 else images
        image_token = spec.option("image_token")
        per_image = spec.option("vision")[5] ** 2
        at = np.flatnonzero(token_ids == image_token)
        if at.size != per_image * images.shape[0]:
            raise CkptflowError(
                f"the prompt has {at.size} image tokens; {images.shape[0]} image(s) need {per_image} each"
            )
        vision = _jitted_vision(self)
        soft = jnp.concatenate([vision(spec, g, jnp.asarray(img.transpose(1, 2, 0))) for img in images])  # NCHW -> HWC
        x = self.embed(spec, rows, index)
        x = x.at[jnp.asarray(at)].set(soft.astype(spec.jdtype)).astype(spec.jdtype)
        return x, {"image_blocks": jnp.asarray(image_blocks(token_ids, image_token))}

    def make_spec(self, cfg) -> ModelSpec:
        multimodal = cfg.model_type == "gemma3"
        t = cfg.get_text_config() if multimodal else cfg
        require(bool(getattr(t, "tie_word_embeddings", True)), "tie_word_embeddings=false")
        require(not getattr(t, "attention_bias", False), "attention_bias=true")
        require(not getattr(t, "use_bidirectional_attention", False), "use_bidirectional_attention=true")
        n = int(t.num_hidden_layers)
        want = gemma3_layer_types(n)
        require(
            list(getattr(t, "layer_types", None) or want) == want,
            "a local/global layer pattern other than MaxText's 5 local + 1 global",
        )
        rp = dict(getattr(t, "rope_parameters", None) or {})
        local_theta, local_factor = _rope_of(rp.get("sliding_attention"), 10000.0)
        global_theta, global_factor = _rope_of(rp.get("full_attention"), 1000000.0)
        require(local_factor == 1.0, "rope scaling on local layers (MaxText forces factor 1 there)")
        require(
            not getattr(t, "attn_logit_softcapping", None) and not getattr(t, "final_logit_softcapping", None),
            "soft-capping (MaxText's gemma3 configs have none)",
        )
        hf_vocab = int(t.vocab_size)
        options = [
            ("global_rope", (global_theta, global_factor)),
            ("query_scale", float(t.query_pre_attn_scalar) ** -0.5),
            ("sliding_window", int(t.sliding_window or 0)),
            ("hf_vocab_size", hf_vocab),
        ]
        if multimodal:
            v = cfg.vision_config
            require(not getattr(v, "vision_use_head", False), "vision_use_head=true")
            require(
                getattr(v, "hidden_act", "gelu_pytorch_tanh") in ("gelu_pytorch_tanh", "gelu_tanh"),
                f"vision hidden_act={v.hidden_act!r}",
            )
            side = int(v.image_size) // int(v.patch_size)
            tokens_side = math.isqrt(int(cfg.mm_tokens_per_image))
            require(
                tokens_side * tokens_side == int(cfg.mm_tokens_per_image) and side % tokens_side == 0,
                "mm_tokens_per_image must pool the patch grid evenly",
            )
            options += [
                (
                    "vision",
                    (
                        int(v.num_hidden_layers),
                        int(v.hidden_size),
                        int(v.num_attention_heads),
                        int(v.patch_size),
                        side,
                        tokens_side,
                        float(v.layer_norm_eps),
                    ),
                ),
                ("image_token", int(cfg.image_token_id)),
            ]
        # MaxText's table holds the vocabulary cut to a multiple of 128 (262208 -> 262144): ids past it do not exist
        # there
        fields = _text_spec(
            t, model_type=cfg.model_type, vocab_size=hf_vocab // 128 * 128 or hf_vocab, rope_theta=local_theta
        )
        return ModelSpec(**fields, options=tuple(options))

    # ---- layout: 6-layer scanned blocks + remainder, or layers_<l> ---------------------------------
    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return (
            *_norm_keys(),
            "self_attention/query_norm/scale",
            "self_attention/key_norm/scale",
            *_attn_keys(),
            *_mlp_keys(),
        )

    def global_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        keys = list(super().global_keys(spec))
        vision = spec.option("vision")
        if vision is not None:
            keys += [
                f"{VISION}/embedding/kernel",
                f"{VISION}/embedding/bias",
                f"{VISION}/pos_embedding",
                f"{VISION}/Transformer/encoder_norm/scale",
                f"{VISION}/Transformer/encoder_norm/bias",
                f"{PROJECTOR}/mm_input_projection/w",
                f"{PROJECTOR}/mm_soft_embedding_norm/scale",
            ]
            keys += [
                f"{VISION}/Transformer/encoderblock_{i}/{k}" for i in range(vision[0]) for k in _vision_block_keys()
            ]
        return tuple(keys)

    def layer_location(self, spec: ModelSpec, layout: Layout, l: int) -> tuple[str, int | None]:
        """(key prefix, index along the scan axis or None) of HF layer l."""
        return gemma3_layer_location(l, spec.num_layers, layout.scanned)

    def layer_markers(self, spec: ModelSpec, l: int) -> dict:
        return {GLOBAL_MARKER: np.zeros((0,), np.float32)} if (l + 1) % GEMMA3_PATTERN == 0 else {}

    def detect_layout(self, spec: ModelSpec, keys) -> Layout:
        scanned = any(k.startswith(("decoder/layers/", "decoder/layers_remainder/")) for k in keys)
        unscanned = any(k.startswith("decoder/layers_") and not k.startswith("decoder/layers_remainder/") for k in keys)
        if scanned and unscanned:
            raise CkptflowError(
                "checkpoint has both scanned (decoder/layers/) and unscanned (decoder/layers_<i>/) layers"
            )
        if not scanned and not unscanned:
            raise CkptflowError("checkpoint has no decoder layers (neither decoder/layers/ nor decoder/layers_0/)")
        return Layout(scanned=scanned, num_layers=spec.num_layers)

    # ---- compute --------------------------------------------------------------------------------
    def block(self, spec: ModelSpec, p: dict, x, positions, image_blocks=None):
        dt = spec.jdtype
        eps = spec.norm_eps
        is_global = GLOBAL_MARKER in p
        h = rms_norm(x, p["pre_self_attention_norm/scale"], eps, dt)
        q = dense(h, p["self_attention/query/kernel"], dt)
        k = dense(h, p["self_attention/key/kernel"], dt)
        v = dense(h, p["self_attention/value/kernel"], dt)
        q = rms_norm(q, p["self_attention/query_norm/scale"], eps, dt)
        k = rms_norm(k, p["self_attention/key_norm/scale"], eps, dt)
        theta, factor = spec.option("global_rope") if is_global else (spec.rope_theta, 1.0)
        q = rope(q, positions, theta, dt, factor)
        k = rope(k, positions, theta, dt, factor)
        q = q * spec.option("query_scale")  # query_pre_attn_scalar, at run time (weak-typed: stays in dt)
        a = gemma_attention(
            q, k, v, dt, window=None if is_global else spec.option("sliding_window"), image_blocks=image_blocks
        )
        a = dense(a, p["self_attention/out/kernel"], dt, contract=2)
        x = x + rms_norm(a, p["post_self_attention_norm/scale"], eps, dt)
        h = rms_norm(x, p["pre_ffw_norm/scale"], eps, dt)
        m = gated_mlp(h, p["mlp/wi_0/kernel"], p["mlp/wi_1/kernel"], p["mlp/wo/kernel"], dt, gelu_tanh)
        return x + rms_norm(m, p["post_ffw_norm/scale"], eps, dt)

    def vision_tokens(self, spec: ModelSpec, g: dict, pixels):
        """Soft tokens of one image: pixels [H, W, C] float32 (MaxText layout) -> [mm_tokens, hidden] float32."""
        layers, H, heads, patch, side, tokens_side, eps = spec.option("vision")
        f32 = jnp.float32
        w = lambda key: g[key].astype(f32)  # noqa: E731  (the tower computes in float32: dtype_mm)
        x = jax.lax.conv_general_dilated(
            pixels[None].astype(f32),
            w(f"{VISION}/embedding/kernel"),
            (patch, patch),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )[0]
        x = x.reshape(side * side, H) + w(f"{VISION}/embedding/bias")
        x = x + w(f"{VISION}/pos_embedding")[0]
        d = H // heads
        for i in range(layers):
            b = f"{VISION}/Transformer/encoderblock_{i}/"
            a = b + "MultiHeadDotProductAttention_0/"
            y = layer_norm(x, w(b + "LayerNorm_0/scale"), w(b + "LayerNorm_0/bias"), eps)
            q = dense(y, w(a + "query/kernel"), f32, bias=w(a + "query/bias")) * d**-0.5
            k = dense(y, w(a + "key/kernel"), f32, bias=w(a + "key/bias"))
            v = dense(y, w(a + "value/kernel"), f32, bias=w(a + "value/bias"))
            att = jax.nn.softmax(jnp.einsum("tnd,snd->nts", q, k), axis=-1)
            o = jnp.einsum("nts,snd->tnd", att, v)
            x = x + dense(o, w(a + "out/kernel"), f32, contract=2, bias=w(a + "out/bias"))
            y = layer_norm(x, w(b + "LayerNorm_1/scale"), w(b + "LayerNorm_1/bias"), eps)
            y = dense(y, w(b + "MlpBlockViT_0/Dense_0/kernel"), f32, bias=w(b + "MlpBlockViT_0/Dense_0/bias"))
            y = dense(
                gelu_tanh(y), w(b + "MlpBlockViT_0/Dense_1/kernel"), f32, bias=w(b + "MlpBlockViT_0/Dense_1/bias")
            )
            x = x + y
        x = layer_norm(
            x, w(f"{VISION}/Transformer/encoder_norm/scale"), w(f"{VISION}/Transformer/encoder_norm/bias"), eps
        )
        k = side // tokens_side  # VisionExit: average pool the patch grid
        x = x.reshape(tokens_side, k, tokens_side, k, H).mean(axis=(1, 3)).reshape(tokens_side * tokens_side, H)
        x = rms_norm(x, w(f"{PROJECTOR}/mm_soft_embedding_norm/scale"), spec.norm_eps, f32)
        return jnp.einsum("tm,md->td", x, w(f"{PROJECTOR}/mm_input_projection/w"))


@functools.lru_cache(maxsize=None)
def _jitted_vision(family: Gemma3Forward):
    return jax.jit(family.vision_tokens, static_argnums=0)


def multimodal_logits(model, token_ids, images) -> np.ndarray:
    """float32 logits `[T, V]` of a Gemma3 multimodal checkpoint for a prompt holding image tokens.

    model: a `ReferenceModel` of a `gemma3` (multimodal) config; images: HF `pixel_values` `[N, C, H, W]`
    (or `[C, H, W]`), already normalized as the processor does; the prompt holds `mm_tokens_per_image`
    image tokens per image, in order.
    """
    return model.logits(token_ids, {"pixel_values": images})


# ------------------------------------------------------------------------------- a prompt with an image


def test_image(channels: int, size: int) -> np.ndarray:
    """A deterministic synthetic picture in [0, 1], `[C, H, W]`: colour gradients, a disc and a checkerboard,
    so every patch differs and a transposed or shuffled patch embedding changes the soft tokens."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    disc = ((x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.06).astype(np.float32)
    checker = ((np.floor(x * 7) + np.floor(y * 5)) % 2).astype(np.float32)
    planes = [x, y, 0.6 * disc + 0.4 * checker, 1 - x * y]
    return np.stack([planes[c % len(planes)] for c in range(channels)]).astype(np.float32)


def gemma3_image_prompt(config: dict, *, seed: int = 0, tokenizer=None):
    """For a multimodal Gemma3 config: (token ids, HF model inputs) of a prompt holding one generated image.

    Layout: BOS, text, <start_of_image>, mm_tokens_per_image image tokens, <end_of_image>, text. Pixels are
    normalized like the Gemma3 processor ((x - 0.5) / 0.5); `token_type_ids` marks the image tokens, which
    makes HF attend bidirectionally within the image as MaxText does. None for text-only configs.
    """
    if config.get("model_type") != "gemma3":
        return None
    from converters.verify.reference.common import hf_config_object

    cfg = hf_config_object(config)
    t, v = cfg.get_text_config(), cfg.vision_config
    image, boi, eoi = int(cfg.image_token_id), int(cfg.boi_token_id), int(cfg.eoi_token_id)
    vocab = int(t.vocab_size) // 128 * 128 or int(t.vocab_size)
    rng = np.random.default_rng(seed + 7919)

    def text(n: int, words: str) -> list[int]:
        if tokenizer is not None:
            return [int(i) for i in tokenizer(words, add_special_tokens=False)["input_ids"]]
        ids = rng.integers(0, vocab, size=n)
        return [int(i) for i in ids if int(i) not in (image, boi, eoi)]

    bos = getattr(t, "bos_token_id", None)
    if bos is None:
        bos = getattr(cfg, "bos_token_id", None)
    ids = ([int(bos)] if bos is not None else []) + text(12, "Here is a picture:")
    ids += [boi] + [image] * int(cfg.mm_tokens_per_image) + [eoi]
    ids += text(48, " Describe what it shows, colour by colour, and say where the round shape is. It shows")
    pixels = (test_image(int(v.num_channels), int(v.image_size)) - 0.5) / 0.5
    types = [1 if i == image else 0 for i in ids]
    return ids, {"pixel_values": pixels[None], "token_type_ids": np.asarray([types], np.int64)}

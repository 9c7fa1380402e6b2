"""DeepSeek-V2 / V3 / V3.2 (HF `deepseek_v2`, `deepseek_v3`, `deepseek_v32`) — MaxText block `deepseek`, attention
`mla`.

What MaxText computes (src/maxtext/models/deepseek.py, layers/attention_mla.py, layers/moe.py,
layers/embeddings.py `YarnRotaryEmbedding`):
  * layers: the first `first_num_dense_layers` with a dense gated MLP (`decoder/dense_layers`), the rest with the
    DeepSeek MoE block (`decoder/moe_layers`); scanned, two stacks with the layer axis at 1; unscanned,
    `dense_layers_<i>` / `moe_layers_<j>` (j counts from the first MoE layer);
  * pre-attention RMSNorm → multi-head latent attention:
      q = wq_b(RMSNorm_q(wq_a(x))) (or `query(x)` without a query LoRA), split per head into [nope | rope];
      wkv_a(x) = [latent | k_rope]; k_nope, v = split(wkv_b(RMSNorm_kv(latent))); k_rope is shared by all heads;
      RoPE on the rope parts over interleaved pairs (2i, 2i+1) with YaRN frequencies (no output scaling:
      `rope_attention_scaling: false`); softmax scale qk_head_dim**-0.5 * m**2 with m = 0.1 mscale ln(factor) + 1
      when YaRN extends the context; causal softmax in float32; `out` over [heads, v_head_dim] → residual;
  * post-attention RMSNorm → dense MLP, or routed experts + shared experts (SiLU-gated) → residual.
Routing as HF computes it (router logits in float32):
  * V3 (`noaux_tc`): s = sigmoid(logits); experts chosen by s + e_score_correction_bias, restricted to the
    `topk_group` of `n_group` groups with the largest sum of their top-2 biased scores; weights are the unbiased
    s of the chosen experts, renormalised when `norm_topk_prob`, times `routed_scaling_factor`;
  * V2 (`greedy` / `group_limited_greedy`): s = softmax(logits); top-k (optionally within the `topk_group` groups
    with the largest max score); renormalised when `norm_topk_prob`; times `routed_scaling_factor`.
V3.2 sparse attention (the indexer, `self_attention/indexer/*`): from the query LoRA output r = RMSNorm_q(wq_a(x)),
q_i = wq_b(r) `[T, Hi, Di]`, k_i = LayerNorm(wk(x)) `[T, Di]` (weight and bias, eps 1e-6); half-split RoPE (not the
interleaved pairs of MLA) on their first qk_rope_head_dim channels; score[t, s] = sum_h w[t, h] relu(q_i[t,h]·k_i[s]
Di**-0.5)
with w = weights_proj(x) Hi**-0.5 (float32); each query attends only to its `index_topk` highest-scoring causal keys
(all of them while there are fewer).
MaxText's shipped V3 config disables group-limited routing (`n_routing_groups: -1`); run MaxText with
`n_routing_groups=<n_group> topk_routing_group=<topk_group>` to match HF (reported as a config warning).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from converters.errors import CkptflowError
from converters.verify.reference.common import (
    MASK_VALUE,
    Forward,
    Layout,
    ModelSpec,
    base_spec,
    dense,
    gated_mlp,
    require,
    rms_norm,
    rope_parameters,
)
from converters.verify.reference.moe import yarn_inv_freq

ATT = "self_attention"
MOE, ROUTED = "DeepSeekMoeBlock_0", "DeepSeekMoeBlock_0/MoeBlock_0"
NORMS = ("pre_self_attention_layer_norm/scale", "post_self_attention_layer_norm/scale")


class DeepSeekForward(Forward):
    def make_spec(self, cfg) -> ModelSpec:
        v3 = cfg.model_type in ("deepseek_v3", "deepseek_v32")
        indexer = None
        if cfg.model_type == "deepseek_v32":
            require(bool(cfg.q_lora_rank), "DeepSeek-V3.2 without a query LoRA")
            indexer = (int(cfg.index_n_heads), int(cfg.index_head_dim), int(cfg.index_topk))
        require(getattr(cfg, "hidden_act", "silu") == "silu", f"hidden_act={cfg.hidden_act!r}")
        require((getattr(cfg, "moe_layer_freq", 1) or 1) == 1, "moe_layer_freq != 1")
        method = getattr(cfg, "topk_method", "noaux_tc" if v3 else "greedy")
        require(method in (("noaux_tc",) if v3 else ("greedy", "group_limited_greedy")), f"topk_method={method!r}")
        rp = rope_parameters(cfg)
        nope, rope, v = int(cfg.qk_nope_head_dim), int(cfg.qk_rope_head_dim), int(cfg.v_head_dim)
        scale = (nope + rope) ** -0.5
        if rp.get("rope_type") == "yarn":
            factor = float(rp["factor"])
            mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")
            require(
                rp.get("attention_factor") is None and mscale == mscale_all,
                "YaRN with mscale != mscale_all_dim or an attention_factor (MaxText has one mscale)",
            )
            original = int(rp.get("original_max_position_embeddings") or 4096)
            yarn = (
                float(rp["rope_theta"]),
                factor,
                float(rp.get("beta_fast") or 32.0),
                float(rp.get("beta_slow") or 1.0),
                original,
                bool(rp.get("truncate", True)),
            )
            if mscale and factor > 1:
                m = 0.1 * float(mscale) * math.log(factor) + 1.0
                scale *= m * m
        else:
            require(rp.get("rope_type", "default") == "default", f"rope_type={rp.get('rope_type')!r}")
            yarn = (float(rp["rope_theta"]), 1.0, 32.0, 1.0, 4096, True)
        n_group = int(getattr(cfg, "n_group", 1) or 1)
        topk_group = int(getattr(cfg, "topk_group", 1) or 1)
        grouped = (v3 or method == "group_limited_greedy") and n_group > 1 and topk_group < n_group
        return ModelSpec(
            **base_spec(cfg, num_kv_heads=int(cfg.num_attention_heads), head_dim=nope + rope),
            options=(
                ("first_dense", int(cfg.first_k_dense_replace)),
                ("groups", (n_group, topk_group) if grouped else None),
                ("indexer", indexer),
                ("mla", (int(cfg.q_lora_rank or 0), int(cfg.kv_lora_rank), nope, rope, v)),
                ("norm_topk_prob", bool(getattr(cfg, "norm_topk_prob", False))),
                ("routed_scaling_factor", float(cfg.routed_scaling_factor)),
                ("sigmoid", v3),
                ("softmax_scale", scale),
                ("top_k", int(cfg.num_experts_per_tok)),
                ("yarn", yarn),
            ),
        )

    def config_warnings(self, cfg) -> list[str]:
        if cfg.model_type in ("deepseek_v3", "deepseek_v32") and int(getattr(cfg, "n_group", 1) or 1) > 1:
            return [
                f"group-limited routing (n_group={cfg.n_group}, topk_group={cfg.topk_group}) is off in MaxText's "
                f"shipped "
                "deepseek3 config; run MaxText with n_routing_groups/topk_routing_group set to these values"
            ]
        return []

    # ---- layout ---------------------------------------------------------------------------------
    def _is_dense(self, spec: ModelSpec, l: int) -> bool:
        return l < spec.option("first_dense")

    def dense_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return (*NORMS, *self.attention_keys(spec), "mlp/wi_0/kernel", "mlp/wi_1/kernel", "mlp/wo/kernel")

    def moe_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        keys = [
            *NORMS,
            *self.attention_keys(spec),
            f"{ROUTED}/gate/kernel",
            f"{ROUTED}/wi_0",
            f"{ROUTED}/wi_1",
            f"{ROUTED}/wo",
            *(f"{MOE}/shared_experts/{k}/kernel" for k in ("wi_0", "wi_1", "wo")),
        ]
        if spec.option("sigmoid"):
            keys.append(f"{ROUTED}/gate/bias")
        return tuple(keys)

    def attention_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        q = ("wq_a/kernel", "q_norm/scale", "wq_b/kernel") if spec.option("mla")[0] else ("query/kernel",)
        idx = (
            "indexer/wq_b/kernel",
            "indexer/wk/kernel",
            "indexer/k_norm/scale",
            "indexer/k_norm/bias",
            "indexer/weights_proj/kernel",
        )
        return tuple(
            f"{ATT}/{k}"
            for k in (
                *q,
                "wkv_a/kernel",
                "kv_norm/scale",
                "wkv_b/kernel",
                "out/kernel",
                *(idx if spec.option("indexer") else ()),
            )
        )

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return self.moe_keys(spec)

    def layer_location(self, spec: ModelSpec, layout: Layout, l: int) -> tuple[str, int | None]:
        k = spec.option("first_dense")
        group, j = ("dense_layers", l) if l < k else ("moe_layers", l - k)
        return (f"decoder/{group}", j) if layout.scanned else (f"decoder/{group}_{j}", None)

    def keys_of_layer(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        return self.dense_keys(spec) if self._is_dense(spec, l) else self.moe_keys(spec)

    def detect_layout(self, spec: ModelSpec, keys) -> Layout:
        scanned = any(k.startswith("decoder/moe_layers/") for k in keys)
        unscanned = any(k.startswith("decoder/moe_layers_") for k in keys)
        if scanned == unscanned:
            raise CkptflowError(
                "checkpoint needs exactly one of decoder/moe_layers/ (scanned) or decoder/moe_layers_<j>/ (unscanned)"
            )
        return Layout(scanned=scanned, num_layers=spec.num_layers)

    def moe_arrays(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        return () if self._is_dense(spec, l) else (f"{ROUTED}/wi_0", f"{ROUTED}/wi_1", f"{ROUTED}/wo")

    # ---- compute --------------------------------------------------------------------------------
    def block(self, spec: ModelSpec, p: dict, x, positions):
        """A dense layer (the first `first_k_dense_replace`); MoE layers run as `pre_moe` / experts / `post_moe`."""
        x, h = self.pre_moe(spec, p, x, positions)
        return x + gated_mlp(h, p["mlp/wi_0/kernel"], p["mlp/wi_1/kernel"], p["mlp/wo/kernel"], spec.jdtype)

    def pre_moe(self, spec: ModelSpec, p: dict, x, positions):
        dt = spec.jdtype
        h = rms_norm(x, p[NORMS[0]], spec.norm_eps, dt)
        x = x + self.mla(spec, p, h, positions)
        return x, rms_norm(x, p[NORMS[1]], spec.norm_eps, dt)

    def route(self, spec: ModelSpec, p: dict, h):
        """HF's routing weights (router logits in float32)."""
        logits = dense(h, p[f"{ROUTED}/gate/kernel"], jnp.float32)
        return route(
            logits,
            p.get(f"{ROUTED}/gate/bias"),
            top_k=spec.option("top_k"),
            sigmoid=spec.option("sigmoid"),
            groups=spec.option("groups"),
            norm=spec.option("norm_topk_prob"),
            scaling=spec.option("routed_scaling_factor"),
        )

    def post_moe(self, spec: ModelSpec, p: dict, x, h, routed):
        shared = gated_mlp(h, *(p[f"{MOE}/shared_experts/{k}/kernel"] for k in ("wi_0", "wi_1", "wo")), spec.jdtype)
        return x + (routed + shared).astype(spec.jdtype)

    def mla(self, spec: ModelSpec, p: dict, h, positions):
        dt, eps = spec.jdtype, spec.norm_eps
        q_lora, kv_lora, nope, rope, _ = spec.option("mla")
        if q_lora:
            q_resid = rms_norm(dense(h, p[f"{ATT}/wq_a/kernel"], dt), p[f"{ATT}/q_norm/scale"], eps, dt)
            q = dense(q_resid, p[f"{ATT}/wq_b/kernel"], dt)
        else:
            q = dense(h, p[f"{ATT}/query/kernel"], dt)  # [T, H, nope + rope]
        kv = dense(h, p[f"{ATT}/wkv_a/kernel"], dt)  # [T, kv_lora + rope]
        latent = rms_norm(kv[:, :kv_lora], p[f"{ATT}/kv_norm/scale"], eps, dt)
        kvb = dense(latent, p[f"{ATT}/wkv_b/kernel"], dt)  # [T, H, nope + v]
        k_nope, v = kvb[..., :nope], kvb[..., nope:]
        theta, factor, beta_fast, beta_slow, original, truncate = spec.option("yarn")
        if factor > 1:
            inv_freq = yarn_inv_freq(rope, theta, factor, beta_fast, beta_slow, original, truncate)
        else:
            inv_freq = 1.0 / (theta ** (jnp.arange(0, rope, 2, dtype=jnp.float32) / rope))
        q_rope = rope_pairs(q[..., nope:], positions, inv_freq, dt)
        k_rope = rope_pairs(kv[:, None, kv_lora:], positions, inv_freq, dt)
        q = jnp.concatenate([q[..., :nope], q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, k_nope.shape[:2] + (rope,))], axis=-1)
        scores = jnp.einsum("thd,shd->hts", q, k).astype(jnp.float32) * spec.option("softmax_scale")
        causal = jnp.arange(q.shape[0])[:, None] >= jnp.arange(k.shape[0])[None, :]
        if spec.option("indexer"):
            causal = causal & self.index_mask(spec, p, h, q_resid, positions, inv_freq, causal)
        weights = jax.nn.softmax(jnp.where(causal[None], scores, MASK_VALUE), axis=-1).astype(dt)
        out = jnp.einsum("hts,shd->thd", weights, v.astype(dt))
        return dense(out, p[f"{ATT}/out/kernel"], dt, contract=2)

    def index_mask(self, spec: ModelSpec, p: dict, h, q_resid, positions, inv_freq, causal):
        """`[T, S]` bool: the keys the V3.2 indexer selects for each query (its top-k causal keys)."""
        heads, dim, topk = spec.option("indexer")
        rope = spec.option("mla")[3]
        f32 = jnp.float32
        q = dense(q_resid, p[f"{ATT}/indexer/wq_b/kernel"], spec.jdtype).astype(f32)  # [T, Hi, Di]
        k = dense(h, p[f"{ATT}/indexer/wk/kernel"], spec.jdtype).astype(f32)  # [T, Di]
        mean = k.mean(-1, keepdims=True)
        var = jnp.square(k - mean).mean(-1, keepdims=True)
        k = (k - mean) * jax.lax.rsqrt(var + 1e-6) * p[f"{ATT}/indexer/k_norm/scale"].astype(f32) + p[
            f"{ATT}/indexer/k_norm/bias"
        ].astype(f32)
        q = jnp.concatenate([rope_halves_f32(q[..., :rope], positions, inv_freq), q[..., rope:]], axis=-1)
        k = jnp.concatenate([rope_halves_f32(k[:, None, :rope], positions, inv_freq)[:, 0], k[:, rope:]], axis=-1)
        scores = jax.nn.relu(jnp.einsum("thd,sd->hts", q, k) * dim**-0.5)
        w = dense(h, p[f"{ATT}/indexer/weights_proj/kernel"], f32) * heads**-0.5  # [T, Hi]
        index = jnp.where(causal, jnp.einsum("th,hts->ts", w, scores), -jnp.inf)
        t, s = index.shape
        top = jax.lax.top_k(index, min(topk, s))[1]
        return jnp.zeros((t, s), bool).at[jnp.arange(t)[:, None], top].set(True)


def rope_pairs(x, positions, inv_freq, dtype):
    """Rotate adjacent pairs (2i, 2i+1) of the last axis by angle position * inv_freq[i] (float32), x: [T, H, R]."""
    angle = positions.astype(jnp.float32)[:, None, None] * inv_freq  # [T, 1, R/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x = x.astype(jnp.float32)
    a, b = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)
    return out.astype(dtype)


def rope_halves_f32(x, positions, inv_freq):
    """Half-split rotation (pairs i, i + R/2) in float32, x: [T, H, R] (the V3.2 indexer's RoPE)."""
    angle = positions.astype(jnp.float32)[:, None, None] * inv_freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def route(logits, bias, *, top_k: int, sigmoid: bool, groups, norm: bool, scaling: float):
    """`[T, E]` float32 routing weights (zero for unselected experts), as HF DeepSeek V2/V3 compute them."""
    t, e = logits.shape
    logits = logits.astype(jnp.float32)
    scores = jax.nn.sigmoid(logits) if sigmoid else jax.nn.softmax(logits, axis=-1)
    choice = scores + bias.astype(jnp.float32) if bias is not None else scores
    if groups is not None:
        n_group, topk_group = groups
        grouped = choice.reshape(t, n_group, e // n_group)
        # V3: sum of each group's two best biased scores; V2 group_limited_greedy: each group's best score
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1) if sigmoid else grouped.max(-1)
        keep = jax.lax.top_k(group_scores, topk_group)[1]
        mask = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], keep].set(True)
        mask = jnp.repeat(mask, e // n_group, axis=1)
        choice = jnp.where(mask, choice, -jnp.inf if sigmoid else 0.0)
    top_i = jax.lax.top_k(choice, top_k)[1]
    top_w = jnp.take_along_axis(scores, top_i, axis=-1)
    if norm:
        top_w = top_w / (top_w.sum(-1, keepdims=True) + 1e-20)
    top_w = top_w * scaling
    return jnp.zeros((t, e), jnp.float32).at[jnp.arange(t)[:, None], top_i].set(top_w)

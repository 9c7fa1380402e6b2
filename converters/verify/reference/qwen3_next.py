"""Qwen3-Next (HF `qwen3_next`) — MaxText decoder block `qwen3_next`.

What MaxText computes (src/maxtext/models/qwen3.py Qwen3-Next layers, layers/moe.py), as HF does:
  * a cycle of `full_attention_interval` (c) layers: gated-delta-net layers, then one full-attention layer; scanned, one
    block per cycle (models/qwen3.py Qwen3NextScannableBlock, layers/nnx_decoders.py _init_scanned_qwen3_next): the
    gated-delta-net layers nested in `decoder/layers/local_layers` (layer c*b + p at [b, p] on axes 1, 2), the
    full-attention layer in `decoder/layers/global_layer` (layer c*b + c - 1 at b on axis 1); unscanned
    `decoder/layers_<i>`; older ckptflow's scanned `decoder/layers/layer_<p>` (layers p, p + c, ...) is read too;
  * every RMSNorm of the decoder (input, post-attention, final, q/k norms) is zero-centred: x / rms(x) * (1 + w),
    computed in float32;
  * full attention: `query` gives per head [query | output gate]; q/k norms; RoPE (half-split) on the first
    `partial_rotary_factor` of head_dim; query times head_dim**-0.5; causal GQA; output times sigmoid(gate); `out`;
  * gated delta net: `in_proj_qkvz` grouped per key head as [q k v z], `in_proj_ba` as [b a]; [q | k | v] (heads
    flattened) through a causal depthwise conv (`conv1d`, kernel `[k, 1, C]`) and SiLU; beta = sigmoid(b),
    g = -exp(A_log) softplus(a + dt_bias); q/k L2-normalised, q / sqrt(key_dim), each key head serving
    value_heads / key_heads consecutive value heads; the delta rule in recurrent form (float32):
    S <- S exp(g); S <- S + k (beta (v - S^T k))^T; o = S^T q; then RMSNorm(o) w * SiLU(z) (`norm/rms_norm`),
    `out_proj`;
  * MoE: softmax top-k routing renormalised (`norm_topk_prob`), SiLU experts, plus the shared expert times
    sigmoid(`shared_expert_gate`(x)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from converters.errors import CkptflowError
from converters.verify.reference.common import (
    Forward,
    Layout,
    ModelSpec,
    base_spec,
    causal_attention,
    dense,
    gated_mlp,
    require,
    rope_halves,
    rope_parameters,
)
from converters.verify.reference.moe import router_weights

LEGACY = "layer_<p>"  # converters.families.qwen3_next.Qwen3Next.legacy_layouts
NORMS = ("input_layernorm/scale", "post_attention_layernorm/scale")
MLP = (
    "mlp/routed_experts/gate/kernel",
    "mlp/routed_experts/wi_0",
    "mlp/routed_experts/wi_1",
    "mlp/routed_experts/wo",
    "mlp/shared_expert/wi_0/kernel",
    "mlp/shared_expert/wi_1/kernel",
    "mlp/shared_expert/wo/kernel",
    "mlp/shared_expert_gate/kernel",
)
FULL = tuple(
    f"attention/attention/{k}"
    for k in ("query/kernel", "key/kernel", "value/kernel", "out/kernel", "query_norm/scale", "key_norm/scale")
)
LINEAR = tuple(
    f"attention/{k}"
    for k in (
        "in_proj_qkvz/kernel",
        "in_proj_ba/kernel",
        "conv1d/kernel",
        "A_log",
        "dt_bias",
        "norm/rms_norm/scale",
        "out_proj/kernel",
    )
)


def rms_norm_1p(x, w, eps: float, dtype):
    """Zero-centred RMSNorm: float32 x / rms(x) * (1 + w), cast to `dtype`."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (y * (1.0 + w.astype(jnp.float32))).astype(dtype)


class Qwen3NextForward(Forward):
    def make_spec(self, cfg) -> ModelSpec:
        n, c = int(cfg.num_hidden_layers), int(getattr(cfg, "full_attention_interval", 4) or 4)
        kinds = ["full_attention" if (i + 1) % c == 0 else "linear_attention" for i in range(n)]
        require(
            list(getattr(cfg, "layer_types", None) or kinds) == kinds, "layer_types other than MaxText's fixed cycle"
        )
        require(
            not (getattr(cfg, "mlp_only_layers", None) or []) and getattr(cfg, "decoder_sparse_step", 1) == 1,
            "dense layers",
        )
        require(bool(getattr(cfg, "norm_topk_prob", False)), "norm_topk_prob=false")
        require(getattr(cfg, "hidden_act", "silu") == "silu", f"hidden_act={cfg.hidden_act!r}")
        rp = rope_parameters(cfg)
        require(rp.get("rope_type", "default") == "default", f"rope_type={rp.get('rope_type')!r}")
        partial = float(rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0)
        return ModelSpec(
            **base_spec(cfg, intermediate_size=int(cfg.moe_intermediate_size)),
            options=(
                ("interval", c),
                (
                    "linear",
                    (
                        int(cfg.linear_num_key_heads),
                        int(cfg.linear_num_value_heads),
                        int(cfg.linear_key_head_dim),
                        int(cfg.linear_value_head_dim),
                    ),
                ),
                ("rotary_dim", int(int(cfg.head_dim) * partial)),
                ("top_k", int(cfg.num_experts_per_tok)),
            ),
        )

    # ---- layout ---------------------------------------------------------------------------------
    def _full(self, spec: ModelSpec, l: int) -> bool:
        return (l + 1) % spec.option("interval") == 0

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return (*NORMS, *LINEAR, *MLP)

    def keys_of_layer(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        return (*NORMS, *(FULL if self._full(spec, l) else LINEAR), *MLP)

    def layer_location(self, spec: ModelSpec, layout: Layout, l: int) -> tuple[str, int | tuple[int, int] | None]:
        c = spec.option("interval")
        b, p = divmod(l, c)
        if not layout.scanned:
            return f"decoder/layers_{l}", None
        if layout.legacy:
            return f"decoder/layers/layer_{p}", b
        return ("decoder/layers/global_layer", b) if p == c - 1 else ("decoder/layers/local_layers", (b, p))

    def detect_layout(self, spec: ModelSpec, keys) -> Layout:
        layout = super().detect_layout(spec, keys)
        if layout.scanned and spec.num_layers % spec.option("interval"):
            raise CkptflowError(f"a scanned Qwen3-Next checkpoint needs a multiple of {spec.option('interval')} layers")
        if layout.scanned and any(k.startswith("decoder/layers/layer_") for k in keys):
            layout.legacy = LEGACY
        return layout

    def layout_warnings(self, spec: ModelSpec, layout: Layout) -> list[str]:
        if layout.legacy:
            return [
                f"scanned Qwen3-Next checkpoint in the older decoder/layers/{LEGACY} layout, which MaxText 0.2.5 does "
                "not load (it expects decoder/layers/{local_layers,global_layer}); re-convert it from HF with this "
                "ckptflow"
            ]
        return []

    def moe_arrays(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        return MLP[1:4]

    # ---- compute --------------------------------------------------------------------------------
    def final_norm(self, spec: ModelSpec, g: dict, y):
        return rms_norm_1p(y, g["decoder/decoder_norm/scale"], spec.norm_eps, spec.jdtype)

    def pre_moe(self, spec: ModelSpec, p: dict, x, positions):
        dt = spec.jdtype
        h = rms_norm_1p(x, p[NORMS[0]], spec.norm_eps, dt)
        if FULL[0] in p:
            x = x + self.full_attention(spec, p, h, positions)
        else:
            x = x + self.gated_delta_net(spec, p, h)
        return x, rms_norm_1p(x, p[NORMS[1]], spec.norm_eps, dt)

    def route(self, spec: ModelSpec, p: dict, h):
        return router_weights(
            h, p["mlp/routed_experts/gate/kernel"], spec.jdtype, top_k=spec.option("top_k"), norm_topk_prob=True
        )

    def post_moe(self, spec: ModelSpec, p: dict, x, h, routed):
        dt = spec.jdtype
        shared = gated_mlp(
            h,
            p["mlp/shared_expert/wi_0/kernel"],
            p["mlp/shared_expert/wi_1/kernel"],
            p["mlp/shared_expert/wo/kernel"],
            dt,
        )
        gate = jax.nn.sigmoid(dense(h, p["mlp/shared_expert_gate/kernel"], dt))
        return x + (routed + gate * shared).astype(dt)

    # RoPE on the rotary part of q / k ([T] positions; Qwen3.5's image prompts: per-frequency positions)
    rotary = staticmethod(rope_halves)

    def full_attention(self, spec: ModelSpec, p: dict, h, positions):
        dt, d, r = spec.jdtype, spec.head_dim, spec.option("rotary_dim")
        a = "attention/attention/"
        qg = dense(h, p[a + "query/kernel"], dt)  # [T, N, 2D]: per head [query | gate]
        q, gate = qg[..., :d], qg[..., d:]
        q = rms_norm_1p(q, p[a + "query_norm/scale"], spec.norm_eps, dt)
        k = rms_norm_1p(dense(h, p[a + "key/kernel"], dt), p[a + "key_norm/scale"], spec.norm_eps, dt)
        v = dense(h, p[a + "value/kernel"], dt)
        q = jnp.concatenate([self.rotary(q[..., :r], positions, spec.rope_theta, dt), q[..., r:]], axis=-1)
        k = jnp.concatenate([self.rotary(k[..., :r], positions, spec.rope_theta, dt), k[..., r:]], axis=-1)
        out = causal_attention(q * (d**-0.5), k, v, dt)  # [T, N, D]
        out = (out * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(dt)).reshape(out.shape[0], -1)
        return dense(out, p[a + "out/kernel"], dt)

    def gated_delta_net(self, spec: ModelSpec, p: dict, h):
        dt, f32 = spec.jdtype, jnp.float32
        nk, nv, dk, dv = spec.option("linear")
        rep, t = nv // nk, h.shape[0]
        qkvz = dense(h, p["attention/in_proj_qkvz/kernel"], dt).reshape(t, nk, 2 * dk + 2 * rep * dv)
        q, k = qkvz[..., :dk], qkvz[..., dk : 2 * dk]
        v, z = qkvz[..., 2 * dk : 2 * dk + rep * dv], qkvz[..., 2 * dk + rep * dv :].reshape(t, nv, dv)
        ba = dense(h, p["attention/in_proj_ba/kernel"], dt).reshape(t, nk, 2 * rep)
        b, a = ba[..., :rep].reshape(t, nv), ba[..., rep:].reshape(t, nv)
        mixed = jnp.concatenate([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], axis=-1)  # [T, C]
        w = p["attention/conv1d/kernel"][:, 0, :].astype(dt)  # [K, C]
        width = w.shape[0]
        padded = jnp.concatenate([jnp.zeros((width - 1, mixed.shape[1]), dt), mixed.astype(dt)], axis=0)
        conv = sum(
            padded[j : j + t] * w[j] for j in range(width)
        )  # causal depthwise: out[t] = sum_j w[j] x[t - K + 1 + j]
        mixed = jax.nn.silu(conv.astype(f32)).astype(dt)
        q = mixed[:, : nk * dk].reshape(t, nk, dk)
        k = mixed[:, nk * dk : 2 * nk * dk].reshape(t, nk, dk)
        v = mixed[:, 2 * nk * dk :].reshape(t, nv, dv).astype(f32)
        beta = jax.nn.sigmoid(b.astype(f32))
        g = -jnp.exp(p["attention/A_log"].astype(f32)) * jax.nn.softplus(
            a.astype(f32) + p["attention/dt_bias"].astype(f32)
        )
        q, k = (
            jnp.repeat(x.astype(f32), rep, axis=1) for x in (q, k)
        )  # key head i serves value heads i*rep .. i*rep+rep-1
        q = q * jax.lax.rsqrt(jnp.sum(q * q, -1, keepdims=True) + 1e-6) / (dk**0.5)
        k = k * jax.lax.rsqrt(jnp.sum(k * k, -1, keepdims=True) + 1e-6)

        def step(state, inputs):  # state [nv, dk, dv]
            q_t, k_t, v_t, g_t, b_t = inputs
            state = state * jnp.exp(g_t)[:, None, None]
            delta = (v_t - jnp.einsum("hkv,hk->hv", state, k_t)) * b_t[:, None]
            state = state + k_t[:, :, None] * delta[:, None, :]
            return state, jnp.einsum("hkv,hk->hv", state, q_t)

        _, core = jax.lax.scan(step, jnp.zeros((nv, dk, dv), f32), (q, k, v, g, beta))  # [T, nv, dv]
        normed = core * jax.lax.rsqrt(jnp.mean(core * core, -1, keepdims=True) + spec.norm_eps)
        normed = p["attention/norm/rms_norm/scale"].astype(dt) * normed.astype(dt)
        out = (normed.astype(f32) * jax.nn.silu(z.astype(f32))).astype(dt)
        return dense(out.reshape(t, nv * dv), p["attention/out_proj/kernel"], dt)

"""Llama 4 text model (HF `llama4_text`) — MaxText decoder block `llama4` (models/llama4.py `Llama4DecoderLayer`).

What MaxText 0.2.5 computes per layer l (layers/attentions.py `Attention.__call__`, layers/moe.py):
  * pre-attention RMSNorm -> q/k/v (no bias);
  * RoPE layers ((l + 1) % 4 != 0, `nope_layer_interval: 4`): `LLaMARotaryEmbedding` (interleaved pairs; llama3
    frequency scaling with MaxText's own constants when `rope_use_scale`), then, with `use_qk_norm`, an L2 norm
    without weights (eps = rms_norm_eps) on q and k; attention within chunks of `chunk_attn_window_size`
    (`AttentionType.CHUNK`: key j visible from query i iff j <= i and i // C == j // C);
  * NoPE layers: no RoPE, no qk norm, global causal attention, and (`temperature_tuning`) the query times
    log(floor((pos + 1) / 8192) + 1) * 0.1 + 1 (models/llama4.py hard-codes 0.1 and 8192);
  * the query times head_dim**-0.5 at run time (`query_pre_attn_scalar`), out projection, residual;
  * post-attention RMSNorm -> dense layers: SiLU-gated `mlp`; MoE layers ((l + 1) % interleave_moe_layer_step
    == 0): `RoutedAndSharedMoE`: router logits in the compute dtype, top-1, the expert's *input* times
    sigmoid(top logit) (float32 sigmoid cast to the compute dtype), combined with weight 1; plus the shared expert
    on the unscaled input (routed + shared), residual.
transformers' Llama4ForCausalLM computes the same (Llama4Router / Llama4TextMoe scale the expert input by the
sigmoid score; `no_rope_layers`, `layer_types` chunked_attention, Llama4TextL2Norm after RoPE).
A multimodal checkpoint (HF `llama4`, Llama4ForConditionalGeneration) is its language model's: the text config is
`text_config`; its vision tower (converted, converters/families/llama4_vision.py) runs on the image prompt
(reference/llama4_vision.py: the projected image features at the image tokens' positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from converters.verify.reference.common import (
    ATTENTION_KEYS,
    GATED_MLP_KEYS,
    ModelSpec,
    PatternStacked,
    base_spec,
    causal_attention,
    dense,
    gated_mlp,
    require,
    rms_norm,
    rope_parameters,
)
from converters.verify.reference.llama import MAXTEXT_LLAMA3_SCALING, rope_interleaved
from converters.verify.reference.llama4_vision import Llama4VisionMixin

MOE = "Llama4MoEBlock_0"
ROUTED = f"{MOE}/MoeBlock_0"
SHARED = f"{MOE}/shared_experts"
NOPE_MARKER = "__nope_layer__"  # present (empty) in the params of layers without RoPE
INTERVAL = 4  # MaxText's nope_layer_interval and inhomogeneous_layer_cycle_interval (both ymls)
TEMP_SCALE, TEMP_FLOOR = 0.1, 8192.0  # models/llama4.py temperature_tuning_scale / _floor_scale
MAXTEXT_CHUNK = 8192  # chunk_attn_window_size in both ymls


def is_nope(l: int) -> bool:
    return (l + 1) % INTERVAL == 0


def l2_norm(x, eps: float):
    """MaxText attentions.py L2Norm (no weight), in x's dtype."""
    return x * jax.lax.rsqrt(jnp.mean(x**2, axis=-1, keepdims=True) + eps)


class Llama4Forward(Llama4VisionMixin, PatternStacked):
    pattern = ("chunked_attention",) * (INTERVAL - 1) + ("full_attention",)
    label = "Llama 4"

    @staticmethod
    def text(cfg):
        """The language model's config: a multimodal (`llama4`) config's `text_config`."""
        return cfg.get_text_config() if getattr(cfg, "model_type", "") == "llama4" else cfg

    def make_spec(self, cfg) -> ModelSpec:
        vision = self.vision_options(cfg)
        cfg = self.text(cfg)
        require(getattr(cfg, "model_type", "") == "llama4_text", f"model_type {getattr(cfg, 'model_type', None)!r}")
        require(getattr(cfg, "hidden_act", "silu") == "silu", f"hidden_act={cfg.hidden_act!r}")
        require(not getattr(cfg, "attention_bias", False), "attention_bias=true (MaxText's llama4 block has none)")
        require(int(cfg.num_experts_per_tok) == 1, "num_experts_per_tok != 1 (MaxText's llama4 routing is top-1)")
        n = int(cfg.num_hidden_layers)
        require(
            list(cfg.no_rope_layers) == [int(not is_nope(l)) for l in range(n)],
            "no_rope_layers other than every 4th layer (MaxText's nope_layer_interval: 4)",
        )
        step = int(cfg.interleave_moe_layer_step)
        require(
            list(cfg.moe_layers) == list(range(step - 1, n, step)) and INTERVAL % step == 0,
            "moe_layers other than every interleave_moe_layer_step-th layer, step dividing 4",
        )
        chunk = getattr(cfg, "attention_chunk_size", None)
        require(chunk is not None, "attention_chunk_size=None (MaxText's RoPE layers always attend in chunks)")
        tuning = bool(getattr(cfg, "attn_temperature_tuning", False))
        require(
            not tuning or (float(cfg.attn_scale), float(cfg.floor_scale)) == (TEMP_SCALE, TEMP_FLOOR),
            f"attn_scale / floor_scale other than {TEMP_SCALE} / {TEMP_FLOOR:g} (MaxText hard-codes them)",
        )
        rp = rope_parameters(cfg)
        require(rp.get("rope_type", "default") in ("default", "llama3"), f"rope_type={rp.get('rope_type')!r}")
        scaling = tuple(sorted(MAXTEXT_LLAMA3_SCALING.items())) if rp.get("rope_type") == "llama3" else None
        return ModelSpec(
            **base_spec(cfg),
            options=(
                ("chunk", int(chunk)),
                ("dense_mlp", int(getattr(cfg, "intermediate_size_mlp", 0) or 0)),
                ("qk_norm", bool(cfg.use_qk_norm)),
                ("rope_scaling", scaling),
                ("step", step),
                ("temperature_tuning", tuning),
                *vision,
            ),
        )

    def config_warnings(self, cfg) -> list[str]:
        out = self.vision_warnings(cfg)
        cfg = self.text(cfg)
        rp = rope_parameters(cfg)
        if rp.get("rope_type") == "llama3":
            diffs = [f"{k}={rp[k]!r}" for k, v in MAXTEXT_LLAMA3_SCALING.items() if k in rp and float(rp[k]) != v]
            if diffs:
                out.append(
                    f"config.json llama3 rope scaling differs from MaxText's constants ({', '.join(diffs)}); the "
                    "reference follows MaxText"
                )
        chunk = getattr(cfg, "attention_chunk_size", None)
        if chunk is not None and int(chunk) != MAXTEXT_CHUNK:
            out.append(
                f"attention_chunk_size={chunk}, MaxText's llama4 ymls set chunk_attn_window_size={MAXTEXT_CHUNK}: "
                f"run MaxText with chunk_attn_window_size={chunk}"
            )
        return out

    # ---- layout ---------------------------------------------------------------------------------
    def global_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return (*super().global_keys(spec), *self.vision_keys(spec))

    def is_moe_layer(self, spec: ModelSpec, l: int) -> bool:
        return (l + 1) % spec.option("step") == 0

    def keys_of_layer(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        if not self.is_moe_layer(spec, l):
            return ATTENTION_KEYS + GATED_MLP_KEYS
        shared = tuple(f"{SHARED}/{k}/kernel" for k in ("wi_0", "wi_1", "wo"))
        return ATTENTION_KEYS + (f"{ROUTED}/gate/kernel", *self.moe_arrays(spec, l), *shared)

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return self.keys_of_layer(spec, 0)

    def moe_arrays(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        return tuple(f"{ROUTED}/{k}" for k in ("wi_0", "wi_1", "wo")) if self.is_moe_layer(spec, l) else ()

    def layer_markers(self, spec: ModelSpec, l: int) -> dict:
        return {NOPE_MARKER: np.zeros((0,), np.float32)} if is_nope(l) else {}

    # ---- compute --------------------------------------------------------------------------------
    def attend(self, spec: ModelSpec, p: dict, x, positions):
        """x after the attention sub-layer, and the post-attention norm of it."""
        dt = spec.jdtype
        h = rms_norm(x, p["pre_self_attention_layer_norm/scale"], spec.norm_eps, dt)
        q = dense(h, p["self_attention/query/kernel"], dt)
        k = dense(h, p["self_attention/key/kernel"], dt)
        v = dense(h, p["self_attention/value/kernel"], dt)
        nope = NOPE_MARKER in p
        if not nope:
            q = rope_interleaved(q, positions, spec.rope_theta, spec.option("rope_scaling"), dt)
            k = rope_interleaved(k, positions, spec.rope_theta, spec.option("rope_scaling"), dt)
            if spec.option("qk_norm"):
                q, k = l2_norm(q, spec.norm_eps), l2_norm(k, spec.norm_eps)
        q = q * (spec.head_dim**-0.5)  # query_pre_attn_scalar, at run time
        if nope and spec.option("temperature_tuning"):
            # float32 positions: MaxText casts them to the compute dtype, which only matters past ~8k tokens
            pos = positions.astype(jnp.float32)
            scale = jnp.log(jnp.floor((pos + 1.0) / TEMP_FLOOR) + 1.0) * TEMP_SCALE + 1.0
            q = (q * scale[:, None, None]).astype(dt)
        a = causal_attention(q, k, v, dt, chunk=None if nope else spec.option("chunk"))
        x = x + dense(a, p["self_attention/out/kernel"], dt, contract=2)
        return x, rms_norm(x, p["post_self_attention_layer_norm/scale"], spec.norm_eps, dt)

    def block(self, spec: ModelSpec, p: dict, x, positions):
        x, h = self.attend(spec, p, x, positions)
        return x + gated_mlp(h, p["mlp/wi_0/kernel"], p["mlp/wi_1/kernel"], p["mlp/wo/kernel"], spec.jdtype)

    def _logits(self, spec: ModelSpec, p: dict, h):
        return dense(h, p[f"{ROUTED}/gate/kernel"], spec.jdtype)

    def pre_moe(self, spec: ModelSpec, p: dict, x, positions):
        """((x, shared expert output), the experts' input h * sigmoid(top logit), the router's input h). The shared
        expert rides along with x so that post_moe adds (routed + shared) to x in MaxText's order."""
        dt = spec.jdtype
        x, h = self.attend(spec, p, x, positions)
        shared = gated_mlp(h, *(p[f"{SHARED}/{k}/kernel"] for k in ("wi_0", "wi_1", "wo")), dt)
        top = jax.lax.top_k(self._logits(spec, p, h), 1)[0]
        score = jax.nn.sigmoid(top.astype(jnp.float32)).astype(dt)
        return (x, shared), (h * score).astype(dt), h

    def route(self, spec: ModelSpec, p: dict, h):
        """Weight 1 on the top-1 expert (MaxText combines llama4's experts with ones)."""
        idx = jax.lax.top_k(self._logits(spec, p, h), 1)[1]
        rows = jnp.arange(h.shape[0])[:, None]
        return jnp.zeros((h.shape[0], p[f"{ROUTED}/gate/kernel"].shape[-1]), spec.jdtype).at[rows, idx].set(1)

    def post_moe(self, spec: ModelSpec, p: dict, x, h, routed):
        x, shared = x
        return x + (routed + shared)

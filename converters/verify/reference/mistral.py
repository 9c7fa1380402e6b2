"""Mistral (HF `mistral`) — MaxText decoder block `mistral`.

What MaxText computes (src/maxtext/models/mistral.py, layers/attentions.py, layers/embeddings.py,
layers/attention_op.py, layers/linears.py):
  * pre-attention RMSNorm → q/k/v DenseGeneral (no bias) → half-split RoPE (`RotaryEmbedding`: dims (i, i + D/2)
    rotate together, sin/cos cast to the activation dtype; the interleaved `LLaMARotaryEmbedding` is chosen only for
    `llama3.1` model names) → causal GQA attention with **no runtime 1/sqrt(head_dim)**: the converter bakes it into
    `query/kernel` → out projection (`[heads, head_dim, emb]`) → residual;
  * post-attention RMSNorm → SiLU-gated MLP (`mlp/wi_0`, `wi_1`, `wo`) → residual.

That is Llama's block with Mixtral's attention; unlike Llama31Forward there is no RoPE permutation and no llama3
frequency scaling, and unlike the Qwen references no query scaling at run time.

Sliding window. MaxText's mistral block always attends globally: its Attention is built with the default
`attention_type` GLOBAL and no `sliding_window_size`, and neither config key reaches it. HF applies
`sliding_window` (Mistral-7B-v0.1: 4096; v0.2, v0.3 and MaxText's mistral-7b: none): key j is visible from query i
iff i - window < j <= i, MaxText's own sliding mask where it has one. The reference applies the window like HF, and
warns. Reason: verification asks whether the checkpoint holds the HF model's values in MaxText's layout (the
layout check compares the HF model on the checkpoint's values with this reference). On a prompt no longer than
the window the two masks are identical (verify's prompts are about 500 tokens, far below any published Mistral
window), so the choice only matters beyond the window, and there the difference is the block's missing window,
which no conversion can fix: following MaxText would fail a correct conversion on a long prompt, following HF
keeps the layout check about the layout and leaves the divergence to the warning.
"""

from __future__ import annotations

from converters.verify.reference.common import (
    ATTENTION_KEYS,
    GATED_MLP_KEYS,
    Forward,
    ModelSpec,
    base_spec,
    dense,
    gated_mlp,
    require,
    rms_norm,
    rope_halves,
    rope_parameters,
)
from converters.verify.reference.moe import attention


def binding_window(cfg) -> int:
    """The config's sliding window if it ever cuts attention short (0 if none, or not shorter than the context)."""
    window = int(getattr(cfg, "sliding_window", None) or 0)
    context = getattr(cfg, "max_position_embeddings", None)
    return window if window and not (context and window >= int(context)) else 0


class MistralForward(Forward):
    def make_spec(self, cfg) -> ModelSpec:
        require(getattr(cfg, "hidden_act", "silu") == "silu", f"hidden_act={cfg.hidden_act!r} (MaxText mistral: silu)")
        rope_type = rope_parameters(cfg).get("rope_type", "default")
        require(rope_type == "default", f"rope_type={rope_type!r} (MaxText's mistral block has plain RoPE)")
        return ModelSpec(**base_spec(cfg), options=(("sliding_window", binding_window(cfg)),))

    def config_warnings(self, cfg) -> list[str]:
        window = binding_window(cfg)
        if not window:
            return []
        return [
            f"sliding_window={window}: the reference applies it like HF, but MaxText's mistral block attends "
            f"globally, so MaxText itself diverges from HF on sequences longer than {window} tokens"
        ]

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return ATTENTION_KEYS + GATED_MLP_KEYS

    def block(self, spec: ModelSpec, p: dict, x, positions):
        dt = spec.jdtype
        h = rms_norm(x, p["pre_self_attention_layer_norm/scale"], spec.norm_eps, dt)
        q = dense(h, p["self_attention/query/kernel"], dt)  # [T, N, D]; 1/sqrt(D) already in the kernel
        k = dense(h, p["self_attention/key/kernel"], dt)
        v = dense(h, p["self_attention/value/kernel"], dt)
        q = rope_halves(q, positions, spec.rope_theta, dt)
        k = rope_halves(k, positions, spec.rope_theta, dt)
        a = attention(q, k, v, dt, window=spec.option("sliding_window") or None)
        x = x + dense(a, p["self_attention/out/kernel"], dt, contract=2)
        h = rms_norm(x, p["post_self_attention_layer_norm/scale"], spec.norm_eps, dt)
        return x + gated_mlp(h, p["mlp/wi_0/kernel"], p["mlp/wi_1/kernel"], p["mlp/wo/kernel"], dt)

"""Rule builders shared by the decoder-only families (Llama-style attention and gated MLP)."""

from __future__ import annotations

import math

from converters.core.mapping import Dims, Family, Rule, require
from converters.core.transforms import Kernel, Permute, Reshape, RopeInterleave, Scale

L = "model.layers.{i}."


def embedding(
    d: Dims, hf: str = "model.embed_tokens.weight", mt_vocab: int | None = None, chain=(), runtime_chain=None
) -> Rule:
    return Rule(
        hf,
        "token_embedder/embedding",
        hf_shape=(d.vocab, d.emb),
        mt_shape=(mt_vocab or d.vocab, d.emb),
        chain=tuple(chain),
        row_axis=0,
        runtime_chain=runtime_chain,
    )


def lm_head(d: Dims, mt_vocab: int | None = None) -> Rule:
    return Rule(
        "lm_head.weight",
        "decoder/logits_dense/kernel",
        hf_shape=(d.vocab, d.emb),
        mt_shape=(d.emb, mt_vocab or d.vocab),
        chain=(Permute((1, 0)),),
        row_axis=1,
    )


def vector(hf: str, mt: str, n: int, chain=()) -> Rule:
    return Rule(hf, mt, hf_shape=(n,), mt_shape=(n,), chain=tuple(chain))


def qk_norms(d: Dims, *, prefix: str = L, mt: str = "self_attention", dim: int | None = None, chain=()) -> list[Rule]:
    """Per-head RMSNorm of queries and keys (Qwen3, Qwen3-MoE, Qwen3-Next, Gemma3): `[head_dim]` scales."""
    a, n = prefix + "self_attn.", dim or d.head_dim
    return [
        vector(a + "q_norm.weight", f"{mt}/query_norm/scale", n, chain),
        vector(a + "k_norm.weight", f"{mt}/key_norm/scale", n, chain),
    ]


def attention(
    d: Dims, *, rope_interleave: bool, scale_query: bool, prefix: str = L, mt: str = "self_attention"
) -> list[Rule]:
    """q/k/v/o projections. MaxText kernels are `[E, heads, head_dim]` in and `[heads, head_dim, E]` out."""
    E, N, K, D = d.emb, d.heads, d.kv_heads, d.head_dim
    q_chain = [Kernel((E, N, D))]
    k_chain = [Kernel((E, K, D))]
    if rope_interleave:
        q_chain.append(RopeInterleave())
        k_chain.append(RopeInterleave())
    if scale_query:  # MaxText applies no 1/sqrt(D) at run time for these blocks: it is baked into the kernel
        q_chain.append(Scale(1.0 / math.sqrt(D)))
    a = prefix + "self_attn."
    return [
        Rule(a + "q_proj.weight", f"{mt}/query/kernel", hf_shape=(N * D, E), mt_shape=(E, N, D), chain=tuple(q_chain)),
        Rule(a + "k_proj.weight", f"{mt}/key/kernel", hf_shape=(K * D, E), mt_shape=(E, K, D), chain=tuple(k_chain)),
        Rule(
            a + "v_proj.weight",
            f"{mt}/value/kernel",
            hf_shape=(K * D, E),
            mt_shape=(E, K, D),
            chain=(Kernel((E, K, D)),),
        ),
        Rule(
            a + "o_proj.weight",
            f"{mt}/out/kernel",
            hf_shape=(E, N * D),
            mt_shape=(N, D, E),
            chain=(Kernel((N, D, E), n_in=2),),
        ),
    ]


def qkv_bias(d: Dims, prefix: str = L, mt: str = "self_attention") -> list[Rule]:
    N, K, D = d.heads, d.kv_heads, d.head_dim
    a = prefix + "self_attn."
    return [
        Rule(
            a + "q_proj.bias",
            f"{mt}/query/bias",
            hf_shape=(N * D,),
            mt_shape=(N, D),
            chain=(Reshape((N, D), (N * D,)),),
        ),
        Rule(
            a + "k_proj.bias", f"{mt}/key/bias", hf_shape=(K * D,), mt_shape=(K, D), chain=(Reshape((K, D), (K * D,)),)
        ),
        Rule(
            a + "v_proj.bias",
            f"{mt}/value/bias",
            hf_shape=(K * D,),
            mt_shape=(K, D),
            chain=(Reshape((K, D), (K * D,)),),
        ),
    ]


def gated_mlp(d: Dims, prefix: str = L, mt: str = "mlp") -> list[Rule]:
    E, F = d.emb, d.mlp
    m = prefix + "mlp."
    return [
        Rule(m + "gate_proj.weight", f"{mt}/wi_0/kernel", hf_shape=(F, E), mt_shape=(E, F), chain=(Kernel((E, F)),)),
        Rule(m + "up_proj.weight", f"{mt}/wi_1/kernel", hf_shape=(F, E), mt_shape=(E, F), chain=(Kernel((E, F)),)),
        Rule(m + "down_proj.weight", f"{mt}/wo/kernel", hf_shape=(E, F), mt_shape=(F, E), chain=(Kernel((F, E)),)),
    ]


class DecoderOnly(Family):
    """Dims from the usual HF config keys, and embedding / final norm / optional lm_head as global rules."""

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        E = require(cfg, "hidden_size", cls.name)
        N = require(cfg, "num_attention_heads", cls.name)
        return Dims(
            emb=E,
            heads=N,
            kv_heads=cfg.get("num_key_value_heads") or N,
            head_dim=cfg.get("head_dim") or E // N,
            mlp=require(cfg, "intermediate_size", cls.name),
            vocab=require(cfg, "vocab_size", cls.name),
            layers=require(cfg, "num_hidden_layers", cls.name),
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )

    @classmethod
    def global_rules(cls, d: Dims):
        rules = [embedding(d), vector("model.norm.weight", "decoder/decoder_norm/scale", d.emb)]
        if not d.tied:
            rules.append(lm_head(d))
        return rules

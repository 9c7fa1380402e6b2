"""Gemma 4 small text models (MaxText decoder block `gemma4_small`, model names `gemma4-e2b`, `gemma4-e4b`).

What MaxText 0.2.5 lays out and computes (src/maxtext/models/gemma4_small.py, layers/nnx_decoders.py
`_init_gemma4_small_layers` / `_apply_gemma4_small_layers`, layers/attentions.py, configs/models/gemma4-e2b.yml and
gemma4-e4b.yml):

* Unscanned only: `decoder/layers_<l>`, one distinct layer per index. nnx_decoders.py `_init_decoder_layers` raises
  for `scan_layers=true` ("gemma4_small (Gemma4 E2B/E4B) does not support pipeline parallelism or scan_layers"; the
  per-layer K/V donors and attention kinds are not expressible inside a scan), and param_mapping.py's
  GEMMA4_SMALL mapping raises "Scan layers is not supported". A scanned tree is refused here with that reason;
  MaxText runs these models with `scan_layers=false`.
* Attention pattern by MaxText model name (`get_attention_pattern`): `gemma4-e2b` 4 sliding-window layers then 1
  global (period 5), every other name 5 + 1 (period 6). transformers' `layer_types` must be that pattern (and its
  last layer is global), so a model has a multiple of the period in layers. A period-5 checkpoint computes as HF
  only under the MaxText name `gemma4-e2b`.
* Global layers: their own head_dim (`global_head_dim`, 512) and the same kv heads (the small block passes no
  `share_kv_projections`, so HF's `attention_k_eq_v` is refused).
* KV sharing (`num_kv_shared_layers`): the last k layers compute no keys or values; each reuses the rotated, normed
  K/V of the last earlier unshared layer of its kind (MaxText `kv_donor_layer_idx`, HF's "store" layers). Shared
  layers hold no `key`, `value`, `key_norm` (MaxText's Attention with `share_kv_layer`); HF checkpoints may still
  carry those tensors (transformers ignores them on load), so they are ignored here too. With
  `use_double_wide_mlp` (e2b) a shared layer's MLP is twice as wide.
* Per-layer inputs (`hidden_size_per_layer_input` P > 0): `decoder/per_layer_embedder/` holds
  `embed_tokens_per_layer` `[vocab_per_layer, L*P]` (HF's table as is: the sqrt(P) scale is applied at run time in
  both), `per_layer_model_projection/kernel` `[E, L*P]` and `per_layer_projection_norm/scale` `[P]`; each layer
  `per_layer_input_gate/kernel` `[E, P]`, `per_layer_projection/kernel` `[P, E]`, `post_per_layer_input_norm/scale`.
  Layer l's input: ((table[id] * sqrt(P))[l] + norm((x0 @ proj / sqrt(E))[l])) / sqrt(2), x0 the scaled embedding;
  after the MLP residual: x + norm(proj(gelu_tanh(gate(x)) * input_l)), then times `layer_scalar`.
* Everything else as the dense gemma4 block (converters/families/gemma4.py): plain RMSNorm scales, no query scaling,
  half-split RoPE (partial on global layers), value norm without scale, and the one scaled tensor: the embedding
  table holds HF's times sqrt(hidden) (float32 product rounded once, as MaxText's hook), the tied output divides by
  sqrt(hidden) again, then the final soft-cap.

Refused with a reason: scanned layouts, multimodal checkpoints (vision / audio towers), `attention_k_eq_v`, the MoE
block, bidirectional attention over all tokens, untied embeddings, attention biases, a layer pattern MaxText cannot
express, KV sharing without an unshared donor of each kind.
"""

from __future__ import annotations

import dataclasses
import math

from converters.core.mapping import Dims, Family, LayerGroup, Rule
from converters.core.transforms import Kernel, Scale
from converters.errors import MappingError, UnsupportedModelError
from converters.families import common
from converters.families.common import L
from converters.families.gemma4 import get, text_dims

PLE = "decoder/per_layer_embedder"
PERIODS = (5, 6)  # MaxText GEMMA4_E2B_ATTENTION_PATTERN (gemma4-e2b), GEMMA4_E4B_ATTENTION_PATTERN (every other name)


def layer_types(n: int, period: int) -> list[str]:
    return ["full_attention" if i % period == period - 1 else "sliding_attention" for i in range(n)]


def first_shared(n: int, shared: int) -> int:
    """The first KV-shared layer (n: none)."""
    return n - shared if shared > 0 else n


def kv_donor(l: int, types: list[str], shared: int) -> int | None:
    """The layer whose K/V layer l reuses (None: its own), MaxText `kv_donor_layer_idx` / HF's "store" layer."""
    first = first_shared(len(types), shared)
    if l < first:
        return None
    return max(j for j in range(first) if types[j] == types[l])


def _text(hidden: int, mlp: int, layers: int, kv: int, period: int, shared: int, double_wide: bool) -> dict:
    """The text model's HF config.json (Gemma4ForCausalLM): dimensions, window, RoPE, eps, soft-cap, per-layer inputs,
    KV sharing from MaxText's configs/models/gemma4-e2b.yml / gemma4-e4b.yml; the other keys from the text_config of
    MaxText's checkpoint_conversion/utils/hf_model_configs.py `gemma4_e2b_dict` / `gemma4_e4b_dict` (the published
    google/gemma-4-E2B-it / E4B-it); eos [1, 106] is that config's top-level list."""
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attention_k_eq_v": False,
        "bos_token_id": 2,
        "dtype": "bfloat16",
        "enable_moe_block": False,
        "eos_token_id": [1, 106],
        "final_logit_softcapping": 30.0,
        "global_head_dim": 512,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hidden,
        "hidden_size_per_layer_input": 256,
        "initializer_range": 0.02,
        "intermediate_size": mlp,
        "layer_types": layer_types(layers, period),
        "max_position_embeddings": 131072,
        "num_attention_heads": 8,
        "num_global_key_value_heads": None,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv,
        "num_kv_shared_layers": shared,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "sliding_window": 512,
        "tie_word_embeddings": True,
        "use_bidirectional_attention": None,
        "use_cache": True,
        "use_double_wide_mlp": double_wide,
        "vocab_size": 262144,
        "vocab_size_per_layer_input": 262144,
    }


GEMMA4_E2B = _text(1536, 6144, 35, 1, 5, 20, True)
GEMMA4_E4B = _text(2560, 10240, 42, 2, 6, 18, False)

# Tiny test models: hidden 72 (sqrt(72) is no power of two: the one scaled tensor), heads x head_dim != hidden, global
# layers with another head_dim, a window of 8, a soft-cap that bites, per-layer inputs of 8 (sqrt(8) at run time) over
# the tiny vocabulary, the last 4 layers KV-shared (a local and a global donor; tiny_config makes at least two
# periods), e2b's period 5 with one kv head and double-wide shared MLPs, e4b's period 6 with two kv heads.
_TINY = {
    "hidden_size": 72,
    "num_attention_heads": 4,
    "head_dim": 16,
    "global_head_dim": 32,
    "intermediate_size": 96,
    "sliding_window": 8,
    "final_logit_softcapping": 5.0,
    "hidden_size_per_layer_input": 8,
    "vocab_size_per_layer_input": 512,
    "num_kv_shared_layers": 4,
}


class Gemma4Small(Family):
    name = "gemma4-small"
    model_types = ("gemma4_text",)
    architectures = ("Gemma4ForCausalLM",)
    reference = "converters.verify.reference.gemma4_small:Gemma4SmallForward"
    test_models = {
        "gemma4-e2b": ("gemma4-e2b", {**_TINY, "num_key_value_heads": 1}),
        "gemma4-e4b": ("gemma4-e4b", {**_TINY, "num_key_value_heads": 2}),
    }
    models = {"gemma4-e2b": GEMMA4_E2B, "gemma4-e4b": GEMMA4_E4B}
    scannable = False  # MaxText 0.2.5 has no scanned gemma4_small tree (see `layer_groups`)

    @classmethod
    def accepts(cls, cfg: dict) -> bool:
        """gemma4_text configs with per-layer inputs or shared KV layers (MaxText's gemma4_small block)."""
        return bool(get(cfg, "hidden_size_per_layer_input") or get(cfg, "num_kv_shared_layers"))

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        if cfg.get("model_type") != "gemma4_text" or cfg.get("text_config") or cfg.get("vision_config"):
            raise UnsupportedModelError(
                "gemma4-small: multimodal checkpoints are not supported (MaxText 0.2.5's gemma4_small has no vision "
                "or audio path); convert the text model (gemma4_text, Gemma4ForCausalLM)"
            )
        refuse = [
            (get(cfg, "enable_moe_block") or cfg.get("num_experts"), "the MoE block"),
            (get(cfg, "use_bidirectional_attention") == "all", "bidirectional attention over all tokens"),
            (get(cfg, "attention_k_eq_v"), "attention_k_eq_v (the gemma4_small block has value projections)"),
        ]
        for bad, what in refuse:
            if bad:
                raise UnsupportedModelError(f"gemma4-small: {what} is not supported")
        n = int(get(cfg, "num_hidden_layers"))
        # transformers' default: every 6th layer global, and the last one
        types = list(cfg.get("layer_types") or [*layer_types(n - 1, 6), "full_attention"])
        period = next((p for p in PERIODS if types == layer_types(n, p)), None)
        if period is None:
            raise MappingError(
                f"gemma4-small: layer_types {types}: MaxText repeats 4 local + 1 global (gemma4-e2b) or 5 + 1 (other "
                "names) and transformers makes the last layer global, so only those patterns over a multiple of 5 or "
                "6 layers can be converted"
            )
        shared = int(get(cfg, "num_kv_shared_layers") or 0)
        first = first_shared(n, shared)
        if shared and (shared >= n or not set(types[first:]) <= set(types[:first])):
            raise MappingError(
                f"gemma4-small: {shared} KV-shared of {n} layers: each shared layer needs an earlier unshared layer of "
                "its kind to take K/V from"
            )
        return text_dims(
            cfg,
            "gemma4_small",
            n,
            period=period,
            first_shared=first,
            double_wide=bool(get(cfg, "use_double_wide_mlp")),
            ple=int(get(cfg, "hidden_size_per_layer_input") or 0),
            ple_vocab=int(get(cfg, "vocab_size_per_layer_input") or 0),
        )

    @classmethod
    def ignored(cls, d: Dims) -> list[str]:
        out = [*super().ignored(d), r"lm_head\.weight"]
        shared = "|".join(str(l) for l in range(d.extra["first_shared"], d.layers))
        if shared:  # unused K/V of shared layers (transformers' _keys_to_ignore_on_load_unexpected)
            out.append(rf"model\.layers\.({shared})\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.weight")
        return out

    @classmethod
    def global_rules(cls, d: Dims) -> list[Rule]:
        rules = [
            # MaxText's table holds sqrt(hidden) (float32, as its converter's hook multiplies); its tied output divides
            # by the exact sqrt(hidden) again
            common.embedding(d, chain=(Scale(math.sqrt(d.emb)),)),
            common.vector("model.norm.weight", "decoder/decoder_norm/scale", d.emb),
        ]
        P, LP, E = d.extra["ple"], d.extra["ple"] * d.layers, d.emb
        if P and d.extra["ple_vocab"]:
            rules += [
                # stored as HF stores it: both scale by sqrt(P) at run time (param_mapping.py: no hook)
                Rule(
                    "model.embed_tokens_per_layer.weight",
                    f"{PLE}/embed_tokens_per_layer",
                    hf_shape=(d.extra["ple_vocab"], LP),
                    mt_shape=(d.extra["ple_vocab"], LP),
                    row_axis=0,
                ),
                Rule(
                    "model.per_layer_model_projection.weight",
                    f"{PLE}/per_layer_model_projection/kernel",
                    hf_shape=(LP, E),
                    mt_shape=(E, LP),
                    chain=(Kernel((E, LP)),),
                ),
                common.vector("model.per_layer_projection_norm.weight", f"{PLE}/per_layer_projection_norm/scale", P),
            ]
        return rules

    @classmethod
    def kind_rules(cls, d: Dims, glob: bool, shared: bool) -> tuple[Rule, ...]:
        """The rules of one layer kind (models/gemma4_small.py Gemma4SmallDecoderLayer.__init__): global layers their
        own head_dim and kv heads; shared layers no key / value / key_norm, and with use_double_wide_mlp twice the
        MLP; per-layer input gate, projection and norm when P > 0."""
        a = d
        if glob:
            a = dataclasses.replace(d, head_dim=d.extra["global_head_dim"], kv_heads=d.extra["global_kv_heads"])
        attn = common.attention(a, rope_interleave=False, scale_query=False)
        norms = common.qk_norms(a)
        if shared:
            attn = [r for r in attn if r.mt.endswith(("/query/kernel", "/out/kernel"))]
            norms = [r for r in norms if r.mt.endswith("/query_norm/scale")]
        mlp = dataclasses.replace(d, mlp=d.mlp * 2) if shared and d.extra["double_wide"] else d
        rules = [
            common.vector(L + "input_layernorm.weight", "pre_self_attention_norm/scale", d.emb),
            common.vector(L + "post_attention_layernorm.weight", "post_self_attention_norm/scale", d.emb),
            common.vector(L + "pre_feedforward_layernorm.weight", "pre_ffw_norm/scale", d.emb),
            common.vector(L + "post_feedforward_layernorm.weight", "post_ffw_norm/scale", d.emb),
            *norms,
            *attn,
            *common.gated_mlp(mlp),
            common.vector(L + "layer_scalar", "layer_scalar", 1),
        ]
        P, E = d.extra["ple"], d.emb
        if P:
            rules += [
                Rule(
                    L + "per_layer_input_gate.weight",
                    "per_layer_input_gate/kernel",
                    hf_shape=(P, E),
                    mt_shape=(E, P),
                    chain=(Kernel((E, P)),),
                ),
                Rule(
                    L + "per_layer_projection.weight",
                    "per_layer_projection/kernel",
                    hf_shape=(E, P),
                    mt_shape=(P, E),
                    chain=(Kernel((P, E)),),
                ),
                common.vector(L + "post_per_layer_input_norm.weight", "post_per_layer_input_norm/scale", E),
            ]
        return tuple(rules)

    @classmethod
    def layer_rules(cls, d: Dims) -> list[Rule]:
        return list(cls.kind_rules(d, False, False))

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        if scan:
            raise UnsupportedModelError(
                "gemma4-small: MaxText 0.2.5 cannot build or load a scanned gemma4_small model (nnx_decoders.py and "
                "configs/types.py raise for scan_layers=true: per-layer K/V donors and attention kinds do not fit a "
                "scan); convert with --no-scan and run MaxText with scan_layers=false"
            )
        period, first = d.extra["period"], d.extra["first_shared"]
        groups = []
        for glob in (False, True):
            for shared in (False, True):
                layers = tuple(
                    i for i in range(d.layers) if (i % period == period - 1) == glob and (i >= first) == shared
                )
                if layers:
                    prefixes = tuple(f"decoder/layers_{i}" for i in layers)
                    groups.append(LayerGroup(cls.kind_rules(d, glob, shared), layers, None, prefixes))
        return groups

"""DeepSeek-V4 (HF `deepseek_v4`, DeepSeek-V4-Flash) — MaxText block `deepseek4`, attention `compressed`.

Layout (MaxText 0.2.5: src/maxtext/models/deepseek4.py, layers/attention_compressed.py, layers/mhc.py, layers/moe.py,
layers/nnx_decoders.py `_init_scanned_deepseek4`; the tree is MaxText's abstract model, checked in
tests/families/test_shapes.py):
  * every layer is MoE (`mlp/MoeBlock_0`: router `gate/kernel`, stacked experts `wi_0`/`wi_1`/`wo` from the
    per-expert `w1`/`w3`/`w2`; `mlp/shared_experts`); the first `num_hash_layers` route by token id through
    `tid2eid` `[vocab, top_k]` (int64 in HF; float32 in MaxText's `Tid2EidVar` collection, where every variable
    must be inexact), the others by score plus the routing bias `gate.bias` (MaxText's `MoEBiasVar` collection);
  * attention (`self_attention`): query LoRA `wq_a` -> `q_norm` -> `wq_b` `[q_lora, H, D]`, one shared KV head
    `wkv` `[emb, 1, D]` with `kv_norm`, per-head `sinks`, the grouped output projection `o_a_proj`
    `[G, H*D/G, R]` (HF `wo_a` `[G*R, H*D/G]`: group g's R rows) then `o_b_proj` `[G*R, emb]`; HF and MaxText
    rotate the same interleaved pairs of the trailing rope slice, so nothing is permuted;
  * per layer, by its compress ratio: 0 = sliding window only (no compressor), 4 = CSA (`csa_compressor` with the
    overlapping 2*D-wide projections and its lightning `indexer`), larger = HCA (`hca_compressor`, D wide); a
    compressor's `ape` is MaxText's `position_bias`, its `norm` the `kv_norm`;
  * manifold-constrained hyper-connections around attention (`hc_attn_*` <-> `mhc_attention`) and the MLP
    (`hc_ffn_*` <-> `mhc_mlp`): HF's `fn` `[(2+n)n, n emb]` rows are n pre, n post and n*n residual mixings, which
    MaxText keeps as `pre_alpha`/`post_alpha`/`res_alpha` `[n emb, n | n | n*n]` (transposed); `base` likewise into
    `pre_beta`/`post_beta` `[n]` and `res_beta` `[n, n]`; `scale` `[3]` into three `*_alpha_scale` `[1]`. MaxText
    also has an RMSNorm scale `mhc_norm/scale` `[n emb]` HF does not: ones on import, and export refuses a checkpoint
    where it is anything else (HF could not hold it); the final `hc_head` (`hc_head_fn` transposed, base, scale);
  * tensors transformers keeps in float32 (`_keep_in_fp32_modules_strict`: every norm, the hyper-connections,
    `sinks`, `position_bias`, the routing bias) stay float32 in the checkpoint whatever `--dtype`, and on export.

Layers: unscanned `decoder/layers_<i>`. Scanned, as MaxText builds it: the hash-routed layers stay unscanned
(`decoder/layers_<i>`, i < num_hash_layers) and the rest are scanned in blocks of two under
`decoder/scanned_blocks/layers_0` (compress ratio 128) and `layers_1` (ratio 4): MaxText fixes those two ratios, so
a config with another pattern after the hash layers is converted unscanned only (refused scanned, with the reason).
The multi-token-prediction layer (`mtp.*`) is not converted, as MaxText's converter drops it.

Names: the published checkpoint's (`embed.weight`, `layers.<i>.attn.wq_a.weight`, `head.weight`, `hc_head_fn`, ...;
transformers renames them on load), which export writes; transformers' own `save_pretrained` names
(`model.layers.*`, `model.embed_tokens.weight`, `model.hc_head.hc_fn`, ..., and `attn.norm` for the published
`attn.kv_norm`, its load-time rename reversed ambiguously) are read too (`hf_aliases`, `hf_renames`).
"""

from __future__ import annotations

import re

from converters.core.mapping import Dims, Family, LayerGroup, Rule, require
from converters.core.transforms import Kernel, Permute, Reshape, Sections
from converters.errors import UnsupportedModelError
from converters.families import common, moe_common

L = "layers.{i}."
A = L + "attn."
ATT, MOE = "self_attention", "mlp/MoeBlock_0"
F32 = "float32"
CSA_RATIO, HCA_SCANNED_RATIO = 4, 128  # MaxText's CSA ratio, and the HCA ratio its scanned blocks are built with


def _flash() -> dict:
    """deepseek-ai/DeepSeek-V4-Flash config.json (MaxText `deepseek4-284b`): 43 layers + 1 MTP layer (the 44th
    compress ratio)."""
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "expert_dtype": "fp4",
        "hc_eps": 1e-06,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "head_dim": 512,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "index_head_dim": 128,
        "index_n_heads": 64,
        "index_topk": 512,
        "initializer_range": 0.02,
        "max_position_embeddings": 1048576,
        "model_type": "deepseek_v4",
        "moe_intermediate_size": 2048,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 64,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 43,
        "num_hash_layers": 3,
        "num_key_value_heads": 1,
        "num_nextn_predict_layers": 1,
        "o_groups": 8,
        "o_lora_rank": 1024,
        "q_lora_rank": 1024,
        "qk_rope_head_dim": 64,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "scale_fmt": "ue8m0",
            "weight_block_size": [128, 128],
        },
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 16,
            "original_max_position_embeddings": 65536,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 1.5,
        "scoring_func": "sqrtsoftplus",
        "sliding_window": 128,
        "swiglu_limit": 10.0,
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.1",
        "use_cache": True,
        "vocab_size": 129280,
        "compress_rope_theta": 160000,
        "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
    }


def compress_ratios(cfg: dict, n: int, family: str) -> list[int]:
    """Each layer's compress ratio: the published `compress_ratios` (which also lists the MTP layer), or transformers'
    `layer_types` with `compress_rates`."""
    ratios = cfg.get("compress_ratios")
    if ratios is None and cfg.get("layer_types") is not None:
        rates = cfg.get("compress_rates") or {}
        try:
            ratios = [0 if t == "sliding_attention" else rates[t] for t in cfg["layer_types"]]
        except KeyError as e:
            raise UnsupportedModelError(f"a {family} config's layer_types has {e} without a compress rate") from None
    if ratios is None:
        raise UnsupportedModelError(f"config.json for a {family} model has neither compress_ratios nor layer_types")
    if len(ratios) < n or not all(isinstance(r, int) and r >= 0 for r in ratios[:n]):
        raise UnsupportedModelError(f"a {family} config needs a compress ratio (int >= 0) for each of its {n} layers")
    bad = [r for r in ratios[:n] if 0 < r < CSA_RATIO]
    if bad:
        raise UnsupportedModelError(
            f"{family}: compress ratio {bad[0]} has no MaxText layout (0: sliding window, 4: CSA, larger: HCA)"
        )
    return list(ratios[:n])


def hash_layers(cfg: dict, n: int, family: str) -> int:
    """How many leading layers route by token id (`num_hash_layers`, or transformers' `mlp_layer_types`)."""
    if cfg.get("num_hash_layers") is not None:
        return int(cfg["num_hash_layers"])
    types = cfg.get("mlp_layer_types")
    if types is None:
        raise UnsupportedModelError(f"config.json for a {family} model has neither num_hash_layers nor mlp_layer_types")
    k = sum(1 for t in types[:n] if t == "hash_moe")
    if list(types[:k]) != ["hash_moe"] * k:
        raise UnsupportedModelError(f"{family}: hash-routed layers must come first (MaxText routes a prefix by hash)")
    return k


def published_name(name: str) -> str:
    """The published checkpoint's name of a tensor transformers' `save_pretrained` names `name` (the inverse of
    `DeepseekV4.hf_aliases` and `hf_renames`)."""
    for want, alt in DeepseekV4.hf_aliases:
        if name.startswith(alt):
            name = want + name[len(alt) :]
            break
    for pattern, repl in DeepseekV4.hf_renames:
        if re.fullmatch(pattern, name):
            name = re.sub(pattern, repl, name)
    return name


def _kernel(hf: str, mt: str, out: int, inp: int, mt_shape=None, dtype=None) -> Rule:
    """torch Linear `[out, in]` <-> MaxText kernel `[in, out]` (or `[in, *mt_shape]`)."""
    shape = (inp, *(mt_shape or (out,)))
    return Rule(hf, mt, hf_shape=(out, inp), mt_shape=shape, chain=(Kernel(shape),), dtype=dtype)


def _vector(hf: str, mt: str, n: int) -> Rule:
    return Rule(hf, mt, hf_shape=(n,), mt_shape=(n,), dtype=F32)


def hyper_connection(d: Dims, hf: str, mt: str) -> list[Rule]:
    """`{hf}_fn` / `_base` / `_scale` <-> `{mt}/{pre,post,res}_{alpha,beta,alpha_scale}`, plus MaxText's `mhc_norm`."""
    n, E = d.extra["hc"], d.emb
    rows = (2 + n) * n
    parts = lambda what: tuple(f"{mt}/{p}_{what}" for p in ("pre", "post", "res"))  # noqa: E731
    return [
        Rule(
            hf + "_fn",
            parts("alpha"),
            hf_shape=(rows, n * E),
            mt_shape=(n * E, n),
            part_shapes=((n * E, n), (n * E, n), (n * E, n * n)),
            chain=(Permute((1, 0)),),
            split=Sections((n, n, n * n), ((n, n * E), (n, n * E), (n * n, n * E)), rest=(n * E,)),
            dtype=F32,
        ),
        Rule(
            hf + "_base",
            parts("beta"),
            hf_shape=(rows,),
            mt_shape=(n,),
            part_shapes=((n,), (n,), (n, n)),
            split=Sections((n, n, n * n), ((n,), (n,), (n, n))),
            dtype=F32,
        ),
        Rule(
            hf + "_scale",
            parts("alpha_scale"),
            hf_shape=(3,),
            mt_shape=(1,),
            split=Sections((1, 1, 1), ((1,), (1,), (1,))),
            dtype=F32,
        ),
        Rule("", f"{mt}/mhc_norm/scale", hf_shape=(), mt_shape=(n * E,), fill=1.0, dtype=F32),
    ]


def compressor(d: Dims, hf: str, mt: str, ratio: int, width: int, overlap: bool) -> list[Rule]:
    """A KV compressor: `wkv`/`wgate` `[c*width, emb]` (c=2 with CSA's overlapping windows) -> `kv_proj`/`gate_proj`,
    `ape` `[ratio, c*width]` -> `position_bias`, `norm` -> `kv_norm` `[width]`."""
    c = 2 if overlap else 1
    return [
        _kernel(hf + "wkv.weight", f"{mt}/kv_proj/kernel", c * width, d.emb),
        _kernel(hf + "wgate.weight", f"{mt}/gate_proj/kernel", c * width, d.emb),
        Rule(hf + "ape", f"{mt}/position_bias", hf_shape=(ratio, c * width), mt_shape=(ratio, c * width), dtype=F32),
        _vector(hf + "norm.weight", f"{mt}/kv_norm/scale", width),
    ]


class DeepseekV4(Family):
    name = "deepseek4"
    model_types = ("deepseek_v4",)
    architectures = ("DeepseekV4ForCausalLM",)
    reference = "converters.verify.reference.deepseek4:DeepseekV4Forward"
    models = {"deepseek4-284b": _flash()}
    # 7 layers: 2 sliding, 1 CSA (hash-routed), then two scanned blocks [HCA 128, CSA 4]; sizes where each
    # dimension differs (emb 64, H*D 128, q_lora 48, o_groups 2 x o_lora 24, index 32 x 16)
    _tiny = {
        "hidden_size": 64,
        "num_attention_heads": 4,
        "head_dim": 32,
        "qk_rope_head_dim": 16,
        "q_lora_rank": 48,
        "o_groups": 2,
        "o_lora_rank": 24,
        # 32 indexer heads: with few, many indexer scores are exactly 0 (every head's ReLU is) and transformers' topk
        # breaks those ties unlike MaxText's (converters/verify/reference/deepseek4.py)
        "index_n_heads": 32,
        "index_head_dim": 16,
        "index_topk": 4,
        "sliding_window": 8,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 40,
        "num_hidden_layers": 7,
        "num_nextn_predict_layers": 0,
        "compress_ratios": [0, 0, 4, 128, 4, 128, 4],
        "rope_scaling": None,
        "quantization_config": None,
        "expert_dtype": None,
    }
    test_models = {"deepseek4": ("deepseek4-284b", _tiny)}
    ignored_hf = (r".*rotary_emb\.inv_freq", r"mtp\..*")
    hf_aliases = (
        ("layers.", "model.layers."),
        ("embed.weight", "model.embed_tokens.weight"),
        ("norm.weight", "model.norm.weight"),
        ("hc_head_fn", "model.hc_head.hc_fn"),
        ("hc_head_base", "model.hc_head.hc_base"),
        ("hc_head_scale", "model.hc_head.hc_scale"),
    )
    hf_renames = ((r"(layers\.\d+\.attn\.)norm\.weight", r"\1kv_norm.weight"),)

    @classmethod
    def dims(cls, cfg: dict) -> Dims:
        f = cls.name
        n = require(cfg, "num_hidden_layers", f)
        d = Dims(
            emb=require(cfg, "hidden_size", f),
            heads=require(cfg, "num_attention_heads", f),
            kv_heads=int(cfg.get("num_key_value_heads") or 1),
            head_dim=require(cfg, "head_dim", f),
            mlp=0,
            vocab=require(cfg, "vocab_size", f),
            layers=n,
            tied=bool(cfg.get("tie_word_embeddings", False)),
        )
        d = moe_common.moe_dims(d, cfg, f, experts_key="n_routed_experts", mlp_key="moe_intermediate_size")
        if d.kv_heads != 1:
            raise UnsupportedModelError(f"{f}: MaxText's compressed attention has one KV head, config has {d.kv_heads}")
        if d.tied:
            raise UnsupportedModelError(f"{f}: tied embeddings have no MaxText deepseek4 layout")
        shared = int(cfg.get("n_shared_experts") or 0)
        if shared < 1:
            raise UnsupportedModelError(f"{f} without a shared expert has no MaxText layout")
        G, R = require(cfg, "o_groups", f), require(cfg, "o_lora_rank", f)
        if (d.heads * d.head_dim) % G:
            raise UnsupportedModelError(f"{f}: heads x head_dim must divide into o_groups={G}")
        ratios = compress_ratios(cfg, n, f)
        k = hash_layers(cfg, n, f)
        if not 0 <= k <= n:
            raise UnsupportedModelError(f"{f}: num_hash_layers={k} must be within 0..{n}")
        d.extra.update(
            q_lora=require(cfg, "q_lora_rank", f),
            groups=G,
            o_lora=R,
            index_heads=require(cfg, "index_n_heads", f),
            index_dim=require(cfg, "index_head_dim", f),
            hc=int(cfg.get("hc_mult") or 4),
            shared_mlp=shared * d.mlp,
            ratios=ratios,
            hash_layers=k,
        )
        return d

    @classmethod
    def global_rules(cls, d: Dims) -> list[Rule]:
        n, E = d.extra["hc"], d.emb
        return [
            common.embedding(d, hf="embed.weight"),
            _vector("norm.weight", "decoder/decoder_norm/scale", E),
            Rule(
                "head.weight",
                "decoder/logits_dense/kernel",
                hf_shape=(d.vocab, E),
                mt_shape=(E, d.vocab),
                chain=(Permute((1, 0)),),
                row_axis=1,
            ),
            _kernel("hc_head_fn", "decoder/hc_head/hc_fn", n, n * E, dtype=F32),
            _vector("hc_head_base", "decoder/hc_head/hc_base", n),
            Rule("hc_head_scale", "decoder/hc_head/hc_scale", hf_shape=(1,), mt_shape=(1,), dtype=F32),
        ]

    @classmethod
    def layer_rules(cls, d: Dims, ratio: int = 0, hashed: bool = False) -> list[Rule]:
        """One layer's rules, for its compress ratio and routing."""
        E, H, D, X = d.emb, d.heads, d.head_dim, moe_common.experts(d)
        Q, G, R = d.extra["q_lora"], d.extra["groups"], d.extra["o_lora"]
        per_group = H * D // G
        rules = [
            _vector(L + "attn_norm.weight", "pre_self_attention_layer_norm/scale", E),
            _vector(L + "ffn_norm.weight", "post_self_attention_layer_norm/scale", E),
            *hyper_connection(d, L + "hc_attn", "mhc_attention"),
            *hyper_connection(d, L + "hc_ffn", "mhc_mlp"),
            _kernel(A + "wq_a.weight", f"{ATT}/wq_a/kernel", Q, E),
            _vector(A + "q_norm.weight", f"{ATT}/q_norm/scale", Q),
            _kernel(A + "wq_b.weight", f"{ATT}/wq_b/kernel", H * D, Q, mt_shape=(H, D)),
            _kernel(A + "wkv.weight", f"{ATT}/wkv/kernel", D, E, mt_shape=(1, D)),
            _vector(A + "kv_norm.weight", f"{ATT}/kv_norm/scale", D),
            _vector(A + "attn_sink", f"{ATT}/sinks", H),
            Rule(  # group g's R rows of wo_a, transposed: [G*R, H*D/G] <-> [G, H*D/G, R]
                A + "wo_a.weight",
                f"{ATT}/o_a_proj/kernel",
                hf_shape=(G * R, per_group),
                mt_shape=(G, per_group, R),
                chain=(Reshape((G, R, per_group), (G * R, per_group)), Permute((0, 2, 1))),
            ),
            _kernel(A + "wo_b.weight", f"{ATT}/o_b_proj/kernel", E, G * R),
        ]
        if ratio == CSA_RATIO:
            Hi, Di = d.extra["index_heads"], d.extra["index_dim"]
            c = f"{ATT}/csa_compressor"
            rules += compressor(d, A + "compressor.", c, ratio, D, overlap=True)
            rules += compressor(d, A + "indexer.compressor.", f"{c}/indexer", ratio, Di, overlap=True)
            rules += [
                _kernel(A + "indexer.wq_b.weight", f"{c}/indexer/q_proj/kernel", Hi * Di, Q),
                _kernel(A + "indexer.weights_proj.weight", f"{c}/indexer/weights_proj/kernel", Hi, E),
            ]
        elif ratio:
            rules += compressor(d, A + "compressor.", f"{ATT}/hca_compressor", ratio, D, overlap=False)
        m = L + "ffn."
        rules += moe_common.router(d, m + "gate", f"{MOE}/gate")
        if hashed:
            rules.append(
                Rule(
                    m + "gate.tid2eid",
                    f"{MOE}/tid2eid",
                    hf_shape=(d.vocab, d.extra["top_k"]),
                    mt_shape=(d.vocab, d.extra["top_k"]),
                    dtype=F32,
                    hf_dtype="int64",
                    collection="Tid2EidVar",
                )
            )
        else:
            rules.append(
                Rule(
                    m + "gate.bias",
                    f"{MOE}/gate/bias",
                    hf_shape=(X,),
                    mt_shape=(X,),
                    dtype=F32,
                    collection="MoEBiasVar",
                    scan_axis=0,
                )
            )
        rules += moe_common.per_expert_glu(d, m + "experts.{e}", MOE, ("w1", "w3", "w2"))
        S = d.extra["shared_mlp"]
        rules += [
            _kernel(m + "shared_experts.w1.weight", "mlp/shared_experts/wi_0/kernel", S, E),
            _kernel(m + "shared_experts.w3.weight", "mlp/shared_experts/wi_1/kernel", S, E),
            _kernel(m + "shared_experts.w2.weight", "mlp/shared_experts/wo/kernel", E, S),
        ]
        return rules

    @classmethod
    def layer_groups(cls, d: Dims, scan: bool) -> list[LayerGroup]:
        ratios, k, n = d.extra["ratios"], d.extra["hash_layers"], d.layers

        def one(i: int) -> LayerGroup:
            return LayerGroup(tuple(cls.layer_rules(d, ratios[i], i < k)), (i,), None, (f"decoder/layers_{i}",))

        if not scan:
            return [one(i) for i in range(n)]
        rest = ratios[k:]
        if len(rest) % 2 or rest != [HCA_SCANNED_RATIO, CSA_RATIO] * (len(rest) // 2):
            raise UnsupportedModelError(
                f"{cls.name}: MaxText scans the layers after the {k} hash-routed ones in blocks of compress ratios "
                f"[{HCA_SCANNED_RATIO}, {CSA_RATIO}]; this config's are {rest}: convert it unscanned (--no-scan)"
            )
        groups = [one(i) for i in range(k)]
        for j, ratio in enumerate((HCA_SCANNED_RATIO, CSA_RATIO)):
            layers = tuple(range(k + j, n, 2))
            if layers:
                groups.append(
                    LayerGroup(tuple(cls.layer_rules(d, ratio)), layers, f"decoder/scanned_blocks/layers_{j}", ())
                )
        return groups

    @classmethod
    def export_config(cls, cfg: dict, dtype: str) -> dict:
        out = super().export_config(cfg, dtype)
        out.pop("expert_dtype", None)  # the export is not quantized
        return out

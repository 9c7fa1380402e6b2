"""DeepSeek-V4 (HF `deepseek_v4`) — MaxText decoder block `deepseek4`, attention `compressed`.

What MaxText 0.2.5 computes (src/maxtext/models/deepseek4.py, layers/nnx_decoders.py, layers/mhc.py,
layers/attention_compressed.py, layers/attention_op.py, layers/moe.py, layers/embeddings.py
`DeepSeekV4RotaryEmbedding`):
  * the residual is N = `mhc_expansion_rate` streams `[T, N, E]`: the embedding repeated N times; after the last layer
    `hc_head` collapses them (`DeepSeek4HyperHead`, float32: sum_k pre_k x_k with pre = sigmoid(hc_scale
    (RMS(flat x) @ hc_fn) + hc_base) + 1e-6, the RMS without a scale), then the final RMSNorm and `logits_dense`;
  * every layer is attention then MoE, each wrapped in a manifold-constrained hyper-connection (`mhc_attention`,
    `mhc_mlp`): from RMSNorm(flat x) (`mhc_norm`, a stored scale) times [pre_alpha | post_alpha | res_alpha],
    pre = sigmoid(pre_alpha_scale h + pre_beta) + 1e-6, post = 2 sigmoid(post_alpha_scale h + post_beta),
    res = Sinkhorn(res_alpha_scale h + res_beta) (softmax over the last axis + 1e-6, then `sinkhorn_iterations`
    column / row normalisations, float32); the branch sees norm(sum_k pre_k x_k) and the streams become
    x'_m = sum_k res[k, m] x_k + post_m branch_out;
  * attention (`CompressedAttention`): q = RoPE(RMS(wq_b(RMSNorm_q(wq_a(h))))) head_dim**-0.5 (the per-head RMS has
    no scale), one shared key = value kv = RoPE(RMSNorm_kv(wkv(h))); RoPE over the trailing qk_rope_head_dim channels
    of a head, interleaved pairs (2i, 2i+1), theta `rope_max_timescale` on sliding-window-only layers and
    `compressed_rope_max_timescale` on compressed ones, no YaRN; keys within `sliding_window_size` of the query
    (causal), then the compressed entries (below), and one learned sink logit per head in the softmax; the output's
    rope channels rotated back (RoPE at -position), then the grouped output projection: heads split into `o_groups`
    groups, each projected by its own `o_a_proj` block to `o_lora_rank`, concatenated, `o_b_proj`;
  * compressed entries, one per complete window of `ratio` tokens (position w ratio, visible to the queries at
    positions >= (w + 1) ratio - 1): HCA (`hca_compressor`, ratio > 4) pools a window as sum softmax(gate +
    position_bias) kv, RMSNorm, RoPE at the window's first position; CSA (`csa_compressor`, ratio 4) projects to
    two series a | b and pools window w from a of window w - 1 and b of window w (2 ratio slots), and a query sees
    only the `indexer_topk` entries its indexer scores highest: the indexer pools its own keys the same way at
    `indexer_head_dim`, q_i = RoPE(q_proj(RMSNorm_q(wq_a(h)))), score = sum_h w_h relu(q_i,h . k_i) Di**-0.5 with
    w = weights_proj(h) Hi**-0.5 (float32);
  * MoE (`RoutedAndSharedMoE`): scores s = sqrtsoftplus(h @ gate) (compute dtype); the first `first_num_hash_layers`
    layers route each token to the experts `tid2eid[token]` (a `Tid2EidVar`, float32 ids), the others to the top-k
    of s + gate/bias (a `MoEBiasVar`); weights = s of the chosen experts, normalised to sum 1, times
    `routed_scaling_factor`; experts SiLU-gated with the gate clipped above and the up projection clipped to
    +-`mlp_activations_limit`; plus one shared expert (not clipped in MaxText, see below).
Layers: unscanned `decoder/layers_<l>`; scanned, the hash-routed prefix unscanned (`decoder/layers_<l>`, l < H) and
the rest in `decoder/scanned_blocks/layers_0` (HCA: layers H, H + 2, ...) and `layers_1` (CSA: H + 1, H + 3, ...), the
layer axis at 1 except for the `MoEBiasVar` gate bias, stacked `[L, E]`.

Where MaxText and transformers 5.24 differ (the reference follows transformers where MaxText cannot express the config
value, as the other families' references do, and warns; docs/adding-a-family.md section 4):
  * YaRN: transformers applies the config's `rope_scaling` (published: YaRN factor 16) to the compressed layers'
    rotary (`rope_parameters["compress"]`, attention factor 1); MaxText's deepseek4 has no YaRN (its
    `DeepSeekV4RotaryEmbedding` takes theta only). The reference uses the YaRN frequencies of the config;
  * the shared expert: transformers clips its gate / up projections at `swiglu_limit` as the routed experts';
    MaxText's shared expert (`MlpBlock`) does not clip. The reference clips (it only matters when an activation
    exceeds the limit);
  * MaxText hard-codes 1e-6 where transformers uses `hc_eps` (pre weights, Sinkhorn) and `rms_norm_eps` (the
    hc_head's RMS); the reference uses the config's values;
  * MaxText's scanned block always builds its HCA layers with ratio 128 (`DeepSeek4ScannableBlock`), unscanned it
    takes `compress_ratios` per layer: a scanned checkpoint of another HCA ratio does not load in MaxText (warned);
  * indexer ties: among equal indexer scores MaxText's `jax.lax.top_k` (and the reference) keeps the lower entry,
    transformers' `torch.topk` not necessarily. Exact ties happen when every indexer head's ReLU is 0 for two entries
    (each 2**-index_n_heads likely for random weights): a tiny model with 4 indexer heads has ~6% zero scores and
    differs from transformers by KL ~6e-2 on 300 tokens while matching MaxText to 1e-12; test models need more heads;
  * transformers normalises the routing weights whatever `norm_topk_prob` says, as MaxText does for sqrtsoftplus /
    sigmoid scores; `n_shared_experts` is unused by transformers (one shared expert of `moe_intermediate_size`),
    so only 1 is accepted.
Everything else is the same computation in both (float32 softmax of the compressor gates in transformers, in the
compute dtype in MaxText: equal in float32 runs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from converters.errors import CkptflowError
from converters.verify.reference.common import (
    MASK_VALUE,
    Forward,
    Layout,
    ModelSpec,
    Shapes,
    dense,
    require,
    rms_norm,
)
from converters.verify.reference.moe import yarn_inv_freq

ATT = "self_attention"
MOE = "mlp/MoeBlock_0"
SHARED = "mlp/shared_experts"
HCA, CSA = f"{ATT}/hca_compressor", f"{ATT}/csa_compressor"
INDEXER = f"{CSA}/indexer"
BIAS = f"{MOE}/gate/bias"  # MoEBiasVar: scanned `[L, E]` (layer axis first)
HC_HEAD = ("decoder/hc_head/hc_fn", "decoder/hc_head/hc_base", "decoder/hc_head/hc_scale")
HASH_INDEX = "__hash_layer_index__"  # int32 scalar in a hash-routed layer's params: its column of `hash_experts`
SCANNED = "decoder/scanned_blocks"
MAXTEXT_EPS = 1e-6  # mhc.py: pre-weight / Sinkhorn / hc_head epsilons, hard-coded
SCANNED_HCA_RATIO = 128  # models/deepseek4.py DeepSeek4ScannableBlock: layers_0 is built with compress_ratio=128
LAYER_TYPE_RATIO = {"sliding_attention": 0}  # the others from compress_rates

MHC_KEYS = (
    "mhc_norm/scale",
    "pre_alpha",
    "post_alpha",
    "res_alpha",
    "pre_beta",
    "post_beta",
    "res_beta",
    "pre_alpha_scale",
    "post_alpha_scale",
    "res_alpha_scale",
)
ATTENTION_KEYS = tuple(
    f"{ATT}/{k}"
    for k in (
        "wq_a/kernel",
        "q_norm/scale",
        "wq_b/kernel",
        "wkv/kernel",
        "kv_norm/scale",
        "sinks",
        "o_a_proj/kernel",
        "o_b_proj/kernel",
    )
)
COMPRESSOR_KEYS = ("kv_proj/kernel", "gate_proj/kernel", "kv_norm/scale", "position_bias")
INDEXER_KEYS = (*COMPRESSOR_KEYS, "q_proj/kernel", "weights_proj/kernel")
EXPERTS = (f"{MOE}/wi_0", f"{MOE}/wi_1", f"{MOE}/wo")


def tid2eid_key(l: int) -> str:
    """A hash-routed layer's token -> experts table (always unscanned: the hash layers are the unscanned prefix)."""
    return f"decoder/layers_{l}/{MOE}/tid2eid"


class DeepseekV4Forward(Forward):
    # ---- spec -------------------------------------------------------------------------------------
    def make_spec(self, cfg) -> ModelSpec:
        n = int(cfg.num_hidden_layers)
        require(int(cfg.num_key_value_heads) == 1, "num_key_value_heads != 1 (one shared key/value head)")
        require(int(getattr(cfg, "n_shared_experts", 1) or 0) == 1, "n_shared_experts != 1")
        require(getattr(cfg, "hidden_act", "silu") == "silu", f"hidden_act={cfg.hidden_act!r}")
        require(not getattr(cfg, "attention_bias", False) and not getattr(cfg, "mlp_bias", False), "biases")
        score = cfg.scoring_func
        require(score in ("sqrtsoftplus", "sigmoid"), f"scoring_func={score!r} (MaxText renormalises only these)")
        limit = cfg.swiglu_limit
        require(limit is not None and float(limit) > 0, f"swiglu_limit={limit!r} (MaxText clips only when > 0)")
        mlp_types = list(cfg.mlp_layer_types)
        hash_layers = sum(1 for t in mlp_types if t == "hash_moe")
        require(
            mlp_types == ["hash_moe"] * hash_layers + ["moe"] * (n - hash_layers),
            "hash-routed layers other than a prefix (MaxText: the first `first_num_hash_layers`)",
        )
        rates = dict(cfg.compress_rates)
        ratios = []
        for t in cfg.layer_types:
            r = LAYER_TYPE_RATIO[t] if t in LAYER_TYPE_RATIO else int(rates[t])
            if t == "compressed_sparse_attention":
                require(r == 4, f"CSA compress rate {r} (MaxText's CSA is compress_ratio 4)")
            elif t == "heavily_compressed_attention":
                require(r > 4, f"HCA compress rate {r} (MaxText's HCA needs compress_ratio > 4)")
            ratios.append(r)
        head_dim = int(cfg.head_dim)
        rope_dim = int(cfg.qk_rope_head_dim)
        require(rope_dim % 2 == 0 and 0 < rope_dim <= head_dim, f"qk_rope_head_dim={rope_dim}")
        require(rope_dim <= int(cfg.index_head_dim), "qk_rope_head_dim > index_head_dim")
        rp = cfg.rope_parameters
        main, comp = dict(rp["main"]), dict(rp["compress"])
        require(main.get("rope_type", "default") == "default", f"main rope_type={main.get('rope_type')!r}")
        kind = comp.get("rope_type", "default")
        require(kind in ("default", "yarn"), f"compress rope_type={kind!r}")
        yarn = None
        if kind == "yarn":
            require(
                float(comp.get("attention_factor", 1.0)) == 1.0
                and not comp.get("mscale")
                and not comp.get("mscale_all_dim"),
                "compress YaRN with an attention factor / mscale",
            )
            yarn = (
                float(comp["factor"]),
                float(comp.get("beta_fast") or 32.0),
                float(comp.get("beta_slow") or 1.0),
                int(comp["original_max_position_embeddings"]),
                bool(comp.get("truncate", True)),
            )
        heads, groups = int(cfg.num_attention_heads), int(cfg.o_groups)
        require(heads * head_dim % groups == 0, "num_attention_heads * head_dim not divisible by o_groups")
        return ModelSpec(
            model_type=cfg.model_type,
            vocab_size=int(cfg.vocab_size),
            hidden_size=int(cfg.hidden_size),
            num_layers=n,
            num_heads=heads,
            num_kv_heads=1,
            head_dim=head_dim,
            intermediate_size=int(cfg.moe_intermediate_size),
            norm_eps=float(cfg.rms_norm_eps),
            rope_theta=float(main["rope_theta"]),
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
            options=(
                ("compress_theta", float(comp["rope_theta"])),
                ("hash_layers", hash_layers),
                ("hc", (int(cfg.hc_mult), int(cfg.hc_sinkhorn_iters), float(cfg.hc_eps))),
                ("indexer", (int(cfg.index_n_heads), int(cfg.index_head_dim), int(cfg.index_topk))),
                ("limit", float(limit)),
                ("main_theta", float(main["rope_theta"])),
                ("num_experts", int(cfg.n_routed_experts)),
                ("o_proj", (groups, int(cfg.o_lora_rank))),
                ("q_lora", int(cfg.q_lora_rank)),
                ("ratios", tuple(ratios)),
                ("rope_dim", rope_dim),
                ("routed_scaling_factor", float(cfg.routed_scaling_factor)),
                ("score", score),
                ("shared_limit", True),  # transformers clips the shared expert; MaxText does not (docstring)
                ("top_k", int(cfg.num_experts_per_tok)),
                ("window", int(cfg.sliding_window)),
                ("yarn", yarn),
            ),
        )

    def config_warnings(self, cfg) -> list[str]:
        out = []
        comp = dict(cfg.rope_parameters["compress"])
        if comp.get("rope_type", "default") == "yarn":
            out.append(
                f"rope_scaling YaRN (factor {comp.get('factor')}) on the compressed layers is not applied by MaxText's "
                "deepseek4 block (no YaRN in DeepSeekV4RotaryEmbedding); MaxText's logits differ from transformers' "
                "on those layers (the reference follows transformers)"
            )
        out.append(
            f"MaxText's deepseek4 shared expert does not clip at swiglu_limit={cfg.swiglu_limit} as transformers "
            "does (routed experts are clipped by both); the reference clips"
        )
        eps = {"hc_eps": float(cfg.hc_eps), "rms_norm_eps (hc_head)": float(cfg.rms_norm_eps)}
        diffs = [f"{k}={v}" for k, v in eps.items() if v != MAXTEXT_EPS]
        if diffs:
            out.append(
                f"MaxText hard-codes 1e-6 for the hyper-connection epsilons, the config has {', '.join(diffs)} "
                "(the reference follows the config)"
            )
        return out

    # ---- layout -----------------------------------------------------------------------------------
    def _ratio(self, spec: ModelSpec, l: int) -> int:
        return spec.option("ratios")[l]

    def _is_hash(self, spec: ModelSpec, l: int) -> bool:
        return l < spec.option("hash_layers")

    def global_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        tables = tuple(tid2eid_key(l) for l in range(spec.option("hash_layers")))
        return (*super().global_keys(spec), *HC_HEAD, *tables)

    def row_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        """The hash layers' tid2eid tables: only the prompts' rows are read (`prompt_extra`)."""
        return tuple(tid2eid_key(l) for l in range(spec.option("hash_layers")))

    def keys_of_layer(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        keys = [
            "pre_self_attention_layer_norm/scale",
            "post_self_attention_layer_norm/scale",
            *(f"{m}/{k}" for m in ("mhc_attention", "mhc_mlp") for k in MHC_KEYS),
            *ATTENTION_KEYS,
        ]
        r = self._ratio(spec, l)
        if r == 4:
            keys += [f"{CSA}/{k}" for k in COMPRESSOR_KEYS] + [f"{INDEXER}/{k}" for k in INDEXER_KEYS]
        elif r > 4:
            keys += [f"{HCA}/{k}" for k in COMPRESSOR_KEYS]
        keys.append(f"{MOE}/gate/kernel")
        if not self._is_hash(spec, l):
            keys.append(BIAS)
        keys += [*EXPERTS, *(f"{SHARED}/{k}/kernel" for k in ("wi_0", "wi_1", "wo"))]
        return tuple(keys)

    def layer_keys(self, spec: ModelSpec) -> tuple[str, ...]:
        return self.keys_of_layer(spec, spec.num_layers - 1)

    def moe_arrays(self, spec: ModelSpec, l: int) -> tuple[str, ...]:
        return EXPERTS

    def detect_layout(self, spec: ModelSpec, keys) -> Layout:
        keys = list(keys)
        h, n = spec.option("hash_layers"), spec.num_layers
        scanned = any(k.startswith(f"{SCANNED}/") for k in keys)
        unscanned = n > h and any(k.startswith(f"decoder/layers_{h}/") for k in keys)
        if scanned == unscanned and n > h:
            raise CkptflowError(
                f"checkpoint needs exactly one of {SCANNED}/ (scanned) or decoder/layers_{h}/ (unscanned) for the "
                f"layers after the {h} hash-routed ones"
            )
        if scanned:
            ratios = spec.option("ratios")[h:]
            if len(ratios) % 2 or any((r == 4) != (i % 2 == 1) or r == 0 for i, r in enumerate(ratios)):
                raise CkptflowError(
                    f"a scanned deepseek4 checkpoint needs the layers after the {h} hash-routed ones to alternate "
                    f"HCA, CSA (MaxText's DeepSeek4ScannableBlock), an even number of them; config has compress "
                    f"ratios {list(ratios)}"
                )
        return Layout(scanned=scanned, num_layers=n)

    def layer_location(self, spec: ModelSpec, layout: Layout, l: int) -> tuple[str, int | None]:
        h = spec.option("hash_layers")
        if not layout.scanned or l < h:
            return f"decoder/layers_{l}", None
        j = l - h
        return f"{SCANNED}/layers_{j % 2}", j // 2

    def layout_warnings(self, spec: ModelSpec, layout: Layout) -> list[str]:
        h = spec.option("hash_layers")
        ratios = {r for r in spec.option("ratios")[h:] if r > 4}
        if layout.scanned and ratios - {SCANNED_HCA_RATIO}:
            return [
                f"MaxText's scanned deepseek4 block builds HCA layers with compress ratio {SCANNED_HCA_RATIO}; this "
                f"checkpoint's HCA ratio {sorted(ratios)} loads in MaxText only unscanned"
            ]
        return []

    def check_params(self, spec: ModelSpec, shapes: Shapes, layout: Layout) -> None:
        """As `Forward.check_params`, reading the scanned gate biases (`[L, E]`, layer axis first) as `[E, L]`."""
        if layout.scanned:
            shapes = {
                k: (v[1], v[0], *v[2:]) if k.startswith(f"{SCANNED}/") and k.endswith(BIAS) and len(v) >= 2 else v
                for k, v in shapes.items()
            }
        super().check_params(spec, shapes, layout)

    def layer_reads(self, spec: ModelSpec, layout: Layout, l: int) -> dict[str, tuple[str, tuple]]:
        reads = super().layer_reads(spec, layout, l)
        prefix, j = self.layer_location(spec, layout, l)
        if BIAS in reads and j is not None:
            reads[BIAS] = (f"{prefix}/{BIAS}", (j,))  # MoEBiasVar stacks the layer axis first
        if l == spec.num_layers - 1:  # the streams are collapsed after the last layer (`final_norm` sees one array)
            reads |= {k: (k, ()) for k in HC_HEAD}
        return reads

    def layer_markers(self, spec: ModelSpec, l: int) -> dict:
        return {HASH_INDEX: np.asarray(l, np.int32)} if self._is_hash(spec, l) else {}

    # ---- compute ------------------------------------------------------------------------------------
    def embed(self, spec: ModelSpec, rows, token_ids):
        """The embedding repeated over the hyper-connection streams (nnx_decoders.py `mhc_expand`): `[T, N, E]`."""
        x = rows.astype(spec.jdtype)[token_ids]
        return jnp.repeat(x[:, None, :], spec.option("hc")[0], axis=1)

    def prompt_extra(self, spec: ModelSpec, g: dict, index: np.ndarray, x) -> dict:
        """Each position's experts in every hash-routed layer, `[T, H, k]` int32 (moe.py casts the float32 table)."""
        keys = self.row_keys(spec)
        if not keys:
            return {}
        ids = np.stack([np.asarray(g[k])[np.asarray(index)] for k in keys], axis=1)
        return {"hash_experts": jnp.asarray(ids.astype(np.int32))}

    def pre_moe(self, spec: ModelSpec, p: dict, x, positions, hash_experts=None):
        dt = spec.jdtype
        layer_in, h_post, h_res = self.mhc_pre(spec, p, "mhc_attention", x)
        h = rms_norm(layer_in, p["pre_self_attention_layer_norm/scale"], spec.norm_eps, dt)
        x = self.mhc_post(spec, p, "mhc_attention", x, self.attention(spec, p, h, positions), h_post, h_res)
        layer_in, _, _ = self.mhc_pre(spec, p, "mhc_mlp", x)
        h = rms_norm(layer_in, p["post_self_attention_layer_norm/scale"], spec.norm_eps, dt)
        if HASH_INDEX in p:
            return x, h, h, jnp.take(hash_experts, p[HASH_INDEX], axis=1)
        return x, h

    def route(self, spec: ModelSpec, p: dict, h, experts=None):
        """`[T, E]` routing weights: scores of the tid2eid (hash layers) or top-k (score + bias) experts, normalised,
        times routed_scaling_factor (moe.py `GateLogit`, `get_topk`, `deepseek_scale_weights`)."""
        dt = spec.jdtype
        logits = dense(h, p[f"{MOE}/gate/kernel"], dt)
        scores = jnp.sqrt(jax.nn.softplus(logits)) if spec.option("score") == "sqrtsoftplus" else jax.nn.sigmoid(logits)
        if experts is None:
            experts = jax.lax.top_k(scores + p[BIAS].astype(dt), spec.option("top_k"))[1]
        w = jnp.take_along_axis(scores, experts, axis=-1)
        w = w / (w.sum(-1, keepdims=True) + 1e-20) * spec.option("routed_scaling_factor")
        t = h.shape[0]
        # .add: a token listing an expert twice (tid2eid) runs it twice in both MaxText and transformers
        return jnp.zeros((t, spec.option("num_experts")), jnp.float32).at[jnp.arange(t)[:, None], experts].add(w)

    def expert(self, spec: ModelSpec, w: dict, h):
        return clipped_swiglu_mlp(h, w["wi_0"], w["wi_1"], w["wo"], spec.option("limit"), spec.jdtype)

    def post_moe(self, spec: ModelSpec, p: dict, x, h, routed):
        dt = spec.jdtype
        kernels = (p[f"{SHARED}/{k}/kernel"] for k in ("wi_0", "wi_1", "wo"))
        limit = spec.option("limit") if spec.option("shared_limit") else None
        out = (routed + clipped_swiglu_mlp(h, *kernels, limit, dt)).astype(dt)
        _, h_post, h_res = self.mhc_pre(spec, p, "mhc_mlp", x)
        x = self.mhc_post(spec, p, "mhc_mlp", x, out, h_post, h_res)
        if HC_HEAD[0] in p:
            x = self.hc_head(spec, p, x)
        return x

    # ---- hyper-connections (layers/mhc.py ManifoldConstrainedHyperConnections, without mHC-lite) -----------
    def mhc_pre(self, spec: ModelSpec, p: dict, m: str, x):
        """The branch input sum_k pre_k x_k, and the projections the post / residual mappings use."""
        dt = spec.jdtype
        t, n, e = x.shape
        eps = spec.option("hc")[2]
        flat = rms_norm(x.reshape(t, n * e), p[f"{m}/mhc_norm/scale"], spec.norm_eps, dt)
        alpha = jnp.concatenate([p[f"{m}/pre_alpha"], p[f"{m}/post_alpha"], p[f"{m}/res_alpha"]], axis=-1)
        mixed = dense(flat, alpha, dt)
        pre = jax.nn.sigmoid(p[f"{m}/pre_alpha_scale"].astype(dt) * mixed[:, :n] + p[f"{m}/pre_beta"].astype(dt)) + eps
        layer_in = jnp.einsum("tk,tkd->td", pre.astype(dt), x)
        return layer_in, mixed[:, n : 2 * n], mixed[:, 2 * n :]

    def mhc_post(self, spec: ModelSpec, p: dict, m: str, x, out, h_post, h_res):
        """Streams after a branch: sum_k res[k, m] x_k + post_m out."""
        dt = spec.jdtype
        t, n, _ = x.shape
        _, iters, eps = spec.option("hc")
        post = 2.0 * jax.nn.sigmoid(p[f"{m}/post_alpha_scale"].astype(dt) * h_post + p[f"{m}/post_beta"].astype(dt))
        logits = p[f"{m}/res_alpha_scale"].astype(dt) * h_res.reshape(t, n, n) + p[f"{m}/res_beta"].astype(dt)
        res = sinkhorn(logits, iters, eps).astype(dt)
        mixed = jnp.einsum("tkm,tkd->tmd", res, x)
        return (mixed + out[:, None, :].astype(dt) * post[:, :, None].astype(dt)).astype(dt)

    def hc_head(self, spec: ModelSpec, p: dict, x):
        """`DeepSeek4HyperHead`: the streams collapsed with sigmoid weights, in float32."""
        t, n, e = x.shape
        f32 = jnp.float32
        eps = spec.option("hc")[2]
        flat = x.reshape(t, n * e).astype(f32)
        flat = flat * jax.lax.rsqrt(jnp.mean(jnp.square(flat), axis=-1, keepdims=True) + spec.norm_eps)
        mixes = jnp.einsum("tm,mk->tk", flat, p[HC_HEAD[0]].astype(f32), precision=jax.lax.Precision.HIGHEST)
        pre = jax.nn.sigmoid(mixes * p[HC_HEAD[2]].astype(f32) + p[HC_HEAD[1]].astype(f32)) + eps
        return jnp.sum(pre[:, :, None] * x.astype(f32), axis=1).astype(spec.jdtype)

    # ---- attention (layers/attention_compressed.py, attention_op.py) ----------------------------------
    def inv_freq(self, spec: ModelSpec, compressed: bool):
        """Rotary frequencies of a layer: plain theta on sliding-only layers, the compress theta (with the config's
        YaRN, see the docstring) on compressed ones."""
        dim = spec.option("rope_dim")
        if not compressed:
            return 1.0 / (spec.option("main_theta") ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        theta, yarn = spec.option("compress_theta"), spec.option("yarn")
        if yarn is None:
            return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        factor, beta_fast, beta_slow, original, truncate = yarn
        return yarn_inv_freq(dim, theta, factor, beta_fast, beta_slow, original, truncate)

    def attention(self, spec: ModelSpec, p: dict, h, positions):
        dt, eps = spec.jdtype, spec.norm_eps
        t = h.shape[0]
        d = spec.head_dim
        hca, csa = f"{HCA}/position_bias" in p, f"{CSA}/position_bias" in p
        inv_freq = self.inv_freq(spec, hca or csa)
        q_normed = rms_norm(dense(h, p[f"{ATT}/wq_a/kernel"], dt), p[f"{ATT}/q_norm/scale"], eps, dt)
        q = unscaled_rms_norm(dense(q_normed, p[f"{ATT}/wq_b/kernel"], dt), eps, dt)  # [T, H, D]
        q = rope_tail(q, positions, inv_freq, dt) * jnp.asarray(d**-0.5, dt)
        kv = rms_norm(dense(h, p[f"{ATT}/wkv/kernel"], dt), p[f"{ATT}/kv_norm/scale"], eps, dt)  # [T, 1, D]
        kv = rope_tail(kv, positions, inv_freq, dt)[:, 0]
        # attention_op.py `generate_attention_mask`: the layer's own keys within the window (LOCAL_SLIDING, and the
        # uncompressed part of COMPRESSED), then the compressed entries with the compressor's mask
        qi, kj = positions[:, None], positions[None, :]
        mask = (kj <= qi) & (qi - kj < spec.option("window"))
        if hca:
            comp, seen = self.hca(spec, p, h, positions, inv_freq)
            kv, mask = jnp.concatenate([kv, comp], axis=0), jnp.concatenate([mask, seen], axis=1)
        elif csa:
            comp, seen = self.csa(spec, p, h, q_normed, positions, inv_freq)
            kv, mask = jnp.concatenate([kv, comp], axis=0), jnp.concatenate([mask, seen], axis=1)
        scores = jnp.einsum("thd,sd->hts", q, kv.astype(dt)).astype(jnp.float32)
        scores = jnp.where(mask[None], scores, MASK_VALUE)
        heads = scores.shape[0]
        sink = jnp.broadcast_to(p[f"{ATT}/sinks"].astype(jnp.float32)[:, None, None], (heads, t, 1))
        weights = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]
        out = jnp.einsum("hts,sd->thd", weights.astype(dt), kv.astype(dt)).astype(dt)
        out = rope_tail(out, positions, inv_freq, dt, reverse=True)  # key = value carried RoPE: undone on the output
        groups, _ = spec.option("o_proj")  # linears.py DeepSeekV4GroupedLinear: [G, H*D/G, R] per group
        grouped = out.reshape(t, groups, -1)
        o_a = jnp.einsum("tgi,gio->tgo", grouped, p[f"{ATT}/o_a_proj/kernel"].astype(dt)).astype(dt)
        return dense(o_a.reshape(t, -1), p[f"{ATT}/o_b_proj/kernel"], dt)

    def hca(self, spec: ModelSpec, p: dict, h, positions, inv_freq):
        """`DeepseekV4HCACompressor`: one entry per closed window, `[W, D]`, and the `[T, W]` visibility."""
        dt = spec.jdtype
        ratio = p[f"{HCA}/position_bias"].shape[0]
        kv, gate = (dense(h, p[f"{HCA}/{k}/kernel"], dt) for k in ("kv_proj", "gate_proj"))
        n, d = h.shape[0] // ratio, kv.shape[-1]
        kv = kv[: n * ratio].reshape(n, ratio, d)
        gate = gate[: n * ratio].reshape(n, ratio, d) + p[f"{HCA}/position_bias"].astype(dt)
        pooled = jnp.sum(kv * jax.nn.softmax(gate, axis=1).astype(dt), axis=1)
        return self._entries(spec, p, HCA, pooled, positions, inv_freq, ratio)

    def _entries(self, spec: ModelSpec, p: dict, at: str, pooled, positions, inv_freq, ratio: int):
        """Normed, rotated (at each window's first position) compressed entries and which queries see them."""
        dt = spec.jdtype
        n = pooled.shape[0]
        comp = rms_norm(pooled, p[f"{at}/kv_norm/scale"], spec.norm_eps, dt)
        starts = positions[: n * ratio : ratio]
        comp = rope_tail(comp[:, None], starts, inv_freq, dt)[:, 0]
        seen = starts[None, :] + ratio <= positions[:, None] + 1
        return comp, seen

    def csa(self, spec: ModelSpec, p: dict, h, q_normed, positions, inv_freq):
        """`DeepseekV4CSACompressor` with its indexer: overlapping windows, each query seeing its top-k entries."""
        dt = spec.jdtype
        heads, dim, topk = spec.option("indexer")
        ratio = p[f"{CSA}/position_bias"].shape[0]
        comp, seen = self._entries(spec, p, CSA, overlap_pool(spec, p, CSA, h, ratio), positions, inv_freq, ratio)
        keys, _ = self._entries(spec, p, INDEXER, overlap_pool(spec, p, INDEXER, h, ratio), positions, inv_freq, ratio)
        n = comp.shape[0]
        if n == 0:
            return comp, seen
        f32 = jnp.float32
        q = dense(q_normed, p[f"{INDEXER}/q_proj/kernel"], dt).reshape(h.shape[0], heads, dim)
        q = rope_tail(q, positions, inv_freq, dt)
        w = dense(h, p[f"{INDEXER}/weights_proj/kernel"], dt).astype(f32) * heads**-0.5
        hi = jax.lax.Precision.HIGHEST
        scores = jax.nn.relu(jnp.einsum("thd,wd->thw", q.astype(f32), keys.astype(f32), precision=hi)) * dim**-0.5
        index = jnp.where(seen, jnp.einsum("thw,th->tw", scores, w, precision=hi), -jnp.inf)
        top = jax.lax.top_k(index, min(topk, n))[1]  # as DeepseekV4Indexer: the lower entry among equal scores
        rows = jnp.arange(h.shape[0])[:, None]
        chosen = jnp.zeros(index.shape, bool).at[rows, top].set(True)
        return comp, chosen & seen


def overlap_pool(spec: ModelSpec, p: dict, at: str, h, ratio: int):
    """CSA pooling (`csa_overlap_pooling`): window w pools the a-series (first half of the projection) of window w - 1
    and the b-series of window w, 2 ratio slots softmax-gated; `[W, D]`."""
    dt = spec.jdtype
    kv, gate = (dense(h, p[f"{at}/{k}/kernel"], dt) for k in ("kv_proj", "gate_proj"))
    n, d = h.shape[0] // ratio, kv.shape[-1] // 2
    if n == 0:  # shorter than one window
        return jnp.zeros((0, d), dt)
    kv = kv[: n * ratio].reshape(n, ratio, 2 * d)
    gate = gate[: n * ratio].reshape(n, ratio, 2 * d) + p[f"{at}/position_bias"].astype(dt)
    a_kv = jnp.concatenate([jnp.zeros((1, ratio, d), dt), kv[:-1, :, :d]], axis=0)
    a_gate = jnp.concatenate([jnp.full((1, ratio, d), -jnp.inf, dt), gate[:-1, :, :d]], axis=0)
    kv = jnp.concatenate([a_kv, kv[:, :, d:]], axis=1)
    gate = jnp.concatenate([a_gate, gate[:, :, d:]], axis=1)
    return jnp.sum(kv * jax.nn.softmax(gate, axis=1).astype(dt), axis=1)


def sinkhorn(logits, iters: int, eps: float):
    """mhc.py `sinkhorn`, float32: softmax over the last axis + eps, then column / row normalisations."""
    t = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) + eps
    t = t / (jnp.sum(t, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        t = t / (jnp.sum(t, axis=-1, keepdims=True) + eps)
        t = t / (jnp.sum(t, axis=-2, keepdims=True) + eps)
    return t


def unscaled_rms_norm(x, eps: float, dtype):
    """RMSNorm without a scale (`q_up_norm`, `with_scale=False`): float32 statistics, cast to `dtype`."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)).astype(dtype)


def rope_tail(x, positions, inv_freq, dtype, *, reverse: bool = False):
    """`DeepSeekV4RotaryEmbedding`: rotate the trailing 2 len(inv_freq) channels of x `[T, H, D]` over interleaved
    pairs (2i, 2i+1) in float32 (the leading channels untouched); `reverse` rotates by -position."""
    angle = positions.astype(jnp.float32)[:, None, None] * inv_freq  # [T, 1, R/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    if reverse:
        sin = -sin
    r = 2 * inv_freq.shape[-1]
    rope = x[..., -r:].astype(jnp.float32)
    a, b = rope[..., 0::2], rope[..., 1::2]
    rotated = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rope.shape).astype(x.dtype)
    return jnp.concatenate([x[..., :-r], rotated], axis=-1).astype(dtype)


def clipped_swiglu_mlp(h, wi_0, wi_1, wo, limit: float | None, dtype):
    """silu(min(x wi_0, limit)) * clip(x wi_1, +-limit) -> wo (moe.py `apply_ffn_activation`, DeepSeek branch);
    `limit` None: unclipped (MaxText's `MlpBlock`)."""
    gate, up = dense(h, wi_0, dtype), dense(h, wi_1, dtype)
    if limit is not None:
        gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return dense((jax.nn.silu(gate) * up).astype(dtype), wo, dtype)


__all__ = ["DeepseekV4Forward", "tid2eid_key"]

"""Logits of MaxText's own model code on a MaxText checkpoint (for checking our JAX reference against MaxText).

Runs ONLY in a separate MaxText virtualenv, never in ckptflow's (MaxText is not a ckptflow dependency):

    python3.12 -m venv /work/mt/venv
    /work/mt/venv/bin/pip install 'maxtext[tpu]==0.2.5'      # runs on CPU (JAX CPU backend)

Usage (one sequence, positions 0..T-1, float32 throughout, dot-product attention, matmul precision highest):

    JAX_PLATFORMS=cpu /work/mt/venv/bin/python bench/maxtext_logits.py \
        --maxtext /tmp/llama-mt/0/items --hf-config /tmp/llama-mt/ckptflow/hf/config.json \
        --model-name llama3.1-8b --ids ids.npy --out maxtext_logits.npy [--set key=value ...]

  --maxtext      the Orbax item directory (what MaxText takes as load_parameters_path), e.g. OUT/0/items; convert
                 with `--dtype float32` to compare with a float32 transformers run (a bf16 checkpoint differs from
                 its float32 source by the rounding alone: KL ~1e-5 on the tiny models)
  --hf-config    the HF config.json the checkpoint was converted from (ckptflow keeps it in OUT/ckptflow/hf/)
  --model-name   the MaxText base model whose yml (maxtext/configs/models/<name>.yml) gives the architecture;
                 its dimensions are overridden from the HF config (see `overrides_from_hf`)
  --ids          token ids: a .npy array, or a text file of integers (whitespace/comma separated)
  --out          where to save float32 logits [T, vocab] (.npy); vocab is the checkpoint's (may be padded)
  --set k=v      extra MaxText config overrides, applied last (e.g. --set n_routing_groups=-1)

The model is built and restored the way MaxText's tests/utils/forward_pass_logit_checker.py does it for the
NNX decoder (pyconfig.initialize -> model_creation_utils.from_pretrained with load_parameters_path ->
model(decoder_input_tokens, decoder_positions, decoder_segment_ids)). from_pretrained silently tolerates
missing / extra / reshaped arrays (missing ones stay randomly initialized), so the script then checks that
every model variable was in the checkpoint with the same shape, and stops otherwise. `scan_layers` follows the
checkpoint (stacked `decoder/layers`, `dense_layers`, `moe_layers` vs `*layers_<i>`). The MaxText overrides
used are printed as JSON on stderr.

What MaxText 0.2.5 does that matters when comparing with transformers (seen on ckptflow's tiny models):
  * tied embeddings (Gemma2/3, Qwen3 small): `attend_on_embedding` casts the table to bfloat16 in the logits
    matmul even with dtype=float32 (ckptflow's reference reproduces it with bf16_tied_logits=True);
  * Gemma3's query scale is not a config key: head_dim**-0.5 for gemma3-4b/12b, (hidden/heads)**-0.5 for
    gemma3-27b, whatever the checkpoint's query_pre_attn_scalar -- pick --model-name accordingly;
  * DeepSeek-V3 group-limited routing: MaxText's shipped ymls leave n_routing_groups=-1; this script sets
    n_routing_groups / topk_routing_group from the HF config (n_group / topk_group) as HF routes;
  * scanned Qwen3-Next: 0.2.5 stores a block as decoder/layers/{local_layers,global_layer}, not layer_0..3;
  * DeepSeek-V4 (deepseek4-tiny): no YaRN for the compressed layers (the published rope_scaling is not expressible),
    the shared expert not clipped at swiglu_limit (transformers clips it), the scanned block's HCA ratio fixed at 128;
    on tiny float32 checkpoints without those three MaxText matches transformers to KL ~3e-11;
  * OLMo 3: every layer gets the one `rope_type`, so a YaRN config rotates the sliding-window layers by YaRN too,
    where transformers uses plain RoPE there (rope_parameters per layer type): pick --model-name olmo3-7b-pt (plain)
    or olmo3-7b (YaRN), and compare with transformers given the same rope on both layer types.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import numpy as np

# ---------------------------------------------------------------------------------------------------------
# HF config -> MaxText config overrides
# ---------------------------------------------------------------------------------------------------------


def _rope(cfg: dict) -> dict:
    """transformers >= 5 keeps rope settings in `rope_parameters`; older configs in rope_theta / rope_scaling."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "rope_theta" not in rp and "rope_theta" in cfg:
        rp["rope_theta"] = cfg["rope_theta"]
    return rp


def _get(cfg: dict, *names, default=None):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


def overrides_from_hf(cfg: dict, decoder_block: str, *, ckpt_vocab: int, scanned: bool) -> dict:
    """MaxText config keys reproducing the (tiny) HF model `cfg` with MaxText's `decoder_block`.

    Only dimensions and per-model constants are set here; everything architectural that is not a config key
    (norm placement, activation, ...) comes from MaxText's model yml / block code.
    """
    if "text_config" in cfg:  # Gemma3 multimodal: the decoder is the text config
        cfg = {**cfg["text_config"], "tie_word_embeddings": True}
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    rp = _rope(cfg)
    o = {
        "base_emb_dim": hidden,
        "base_num_query_heads": heads,
        "base_num_kv_heads": int(_get(cfg, "num_key_value_heads", default=heads)),
        "head_dim": int(_get(cfg, "head_dim", default=hidden // heads)),
        "base_mlp_dim": int(_get(cfg, "intermediate_size", "moe_intermediate_size")),  # DeepSeek-V4: moe_ only
        "base_num_decoder_layers": int(cfg["num_hidden_layers"]),
        "vocab_size": int(ckpt_vocab),
        "normalization_layer_epsilon": float(_get(cfg, "rms_norm_eps", "layer_norm_epsilon", default=1e-6)),
        "logits_via_embedding": bool(cfg.get("tie_word_embeddings", False)),
        "scan_layers": bool(scanned),
    }
    if "rope_theta" in rp:
        o["rope_max_timescale"] = float(rp["rope_theta"])

    def yarn():
        o.update(
            rope_factor=float(rp["factor"]),
            original_max_position_embeddings=int(rp["original_max_position_embeddings"]),
            max_position_embeddings=int(
                _get(cfg, "max_position_embeddings", default=o.get("max_position_embeddings", 163840))
            ),
            beta_fast=float(rp.get("beta_fast", 32)),
            beta_slow=float(rp.get("beta_slow", 1)),
        )

    if decoder_block in ("qwen3_moe", "mixtral", "gpt_oss", "qwen3_next"):
        o["num_experts"] = int(_get(cfg, "num_experts", "num_local_experts"))
        o["num_experts_per_tok"] = int(_get(cfg, "num_experts_per_tok", "experts_per_token"))
    if decoder_block == "qwen3_moe":
        o["base_moe_mlp_dim"] = int(cfg["moe_intermediate_size"])
        o["base_mlp_dim"] = int(cfg["moe_intermediate_size"])  # every layer is MoE
        o["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
    elif decoder_block == "mixtral":
        o["base_moe_mlp_dim"] = int(cfg["intermediate_size"])
    elif decoder_block == "gpt_oss":
        o["base_moe_mlp_dim"] = int(cfg["intermediate_size"])
        o["sliding_window_size"] = int(cfg["sliding_window"])
        o["mlp_activations_limit"] = float(cfg.get("swiglu_limit", 7.0))
        yarn()
    elif decoder_block == "qwen3_next":
        o.update(
            base_moe_mlp_dim=int(cfg["moe_intermediate_size"]),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            gdn_conv_kernel_dim=int(cfg["linear_conv_kernel_dim"]),
            gdn_key_head_dim=int(cfg["linear_key_head_dim"]),
            gdn_value_head_dim=int(cfg["linear_value_head_dim"]),
            gdn_num_key_heads=int(cfg["linear_num_key_heads"]),
            gdn_num_value_heads=int(cfg["linear_num_value_heads"]),
            inhomogeneous_layer_cycle_interval=int(cfg.get("full_attention_interval", 4)),
            partial_rotary_factor=float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))),
            shared_experts=1 if cfg.get("shared_expert_intermediate_size") else 0,
        )
    elif decoder_block == "deepseek":
        n_group = int(cfg.get("n_group") or 1)
        o.update(
            first_num_dense_layers=int(cfg.get("first_k_dense_replace", 0)),
            base_moe_mlp_dim=int(cfg["moe_intermediate_size"]),
            num_experts=int(cfg["n_routed_experts"]),
            num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            shared_experts=int(cfg.get("n_shared_experts") or 0),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            q_lora_rank=int(cfg.get("q_lora_rank") or 0),
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
            qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
            v_head_dim=int(cfg["v_head_dim"]),
            mscale=float(rp.get("mscale_all_dim", rp.get("mscale", 1.0))),
            # HF routes within the top `topk_group` of `n_group` expert groups (DeepSeek-V3); MaxText's shipped
            # deepseek3 ymls leave this off (n_routing_groups=-1), so set it from the HF config
            n_routing_groups=n_group if n_group > 1 else -1,
            topk_routing_group=int(cfg.get("topk_group") or 1) if n_group > 1 else -1,
        )
        if "index_topk" in cfg:  # DeepSeek-V3.2 sparse-attention indexer
            o.update(
                indexer_n_heads=int(cfg["index_n_heads"]),
                indexer_head_dim=int(cfg["index_head_dim"]),
                indexer_topk=int(cfg["index_topk"]),
            )
        if rp.get("rope_type", rp.get("type")) == "yarn":
            yarn()
    elif decoder_block == "deepseek4":
        # models/deepseek4.py: per-layer compress_ratios (0 sliding, 4 CSA, > 4 HCA; the scanned block hard-codes
        # HCA 128), the hash-routed prefix, mHC streams, grouped output projection; no YaRN (DeepSeekV4RotaryEmbedding
        # takes a theta only), so the compressed layers' rope_scaling is not expressible
        # (the published config.json's compress_ratios / num_hash_layers / qk_rope_head_dim, or transformers' saved
        # layer_types + compress_rates / mlp_layer_types / partial_rotary_factor)
        n = int(cfg["num_hidden_layers"])
        rates = {"sliding_attention": 0, **dict(cfg.get("compress_rates") or {})}
        ratios = cfg.get("compress_ratios") or [rates[t] for t in cfg["layer_types"]]
        hashed = cfg.get("num_hash_layers")
        if hashed is None:
            hashed = sum(1 for t in cfg.get("mlp_layer_types") or [] if t == "hash_moe")
        ropes = dict(cfg.get("rope_parameters") or {})
        head_dim = int(cfg["head_dim"])
        rope_dim = cfg.get("qk_rope_head_dim") or head_dim * float(cfg.get("partial_rotary_factor") or 64 / 512)
        o.update(
            base_moe_mlp_dim=int(cfg["moe_intermediate_size"]),
            num_experts=int(cfg["n_routed_experts"]),
            num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            shared_experts=1,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            routed_score_func=str(cfg.get("scoring_func", "sqrtsoftplus")),
            mlp_activations_limit=float(cfg.get("swiglu_limit") or 0.0),
            q_lora_rank=int(cfg["q_lora_rank"]),
            qk_rope_head_dim=int(rope_dim),
            first_num_hash_layers=int(hashed),
            mhc_expansion_rate=int(cfg.get("hc_mult", 4)),
            sinkhorn_iterations=int(cfg.get("hc_sinkhorn_iters", 20)),
            indexer_n_heads=int(cfg["index_n_heads"]),
            indexer_head_dim=int(cfg["index_head_dim"]),
            indexer_topk=int(cfg["index_topk"]),
            o_groups=int(cfg["o_groups"]),
            o_lora_rank=int(cfg["o_lora_rank"]),
            sliding_window_size=int(cfg["sliding_window"]),
            compress_ratios=[int(r) for r in ratios[:n]],
            rope_max_timescale=float(dict(ropes.get("main") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))),
            compressed_rope_max_timescale=float(
                dict(ropes.get("compress") or {}).get("rope_theta", cfg.get("compress_rope_theta", 160000.0))
            ),
        )
    elif decoder_block == "gemma2":
        # one MaxText gemma2 layer is a (local, global) pair of HF layers
        o["base_num_decoder_layers"] = int(cfg["num_hidden_layers"]) // 2
        o["sliding_window_size"] = int(cfg["sliding_window"])
        o["final_logits_soft_cap"] = float(cfg.get("final_logit_softcapping") or 0.0)
        o["attn_logits_soft_cap"] = float(cfg.get("attn_logit_softcapping") or 0.0)
    elif decoder_block == "gemma3":
        o["sliding_window_size"] = int(cfg["sliding_window"])
        local = dict(rp.get("sliding_attention") or {})
        full = dict(rp.get("full_attention") or {})
        if local:
            o["local_rope_max_timescale"] = float(local.get("rope_theta", 10000.0))
        if full:
            o["rope_max_timescale"] = float(full.get("rope_theta", 1e6))
            o["rope_linear_scaling_factor"] = (
                float(full.get("factor", 1.0)) if full.get("rope_type") == "linear" else 1.0
            )
        else:
            o.pop("rope_max_timescale", None)
        # NB: MaxText's gemma3 query scale is not a config key: head_dim**-0.5 for gemma3-4b/12b,
        # (hidden/heads)**-0.5 for gemma3-27b (models/gemma3.py get_query_pre_attn_scalar)
    elif decoder_block in ("gemma4", "gemma4_small"):
        # models/gemma4.py (gemma4_small.py alike): per-type RoPE (local_/global_rope_max_timescale,
        # *_rope_proportion), the global layers' own head_dim and kv heads, keys as values on global layers
        # (share_kv_projections)
        local = dict(rp.get("sliding_attention") or {})
        full = dict(rp.get("full_attention") or {})
        per_layer = [dict(v) for v in (cfg.get("per_layer_config") or {}).values()]
        k_eq_v = bool(cfg.get("attention_k_eq_v", False))
        g_head = cfg.get("global_head_dim") or (per_layer[0].get("head_dim") if per_layer else None) or o["head_dim"]
        g_kv = (cfg.get("num_global_key_value_heads") if k_eq_v else None) or (
            per_layer[0].get("num_key_value_heads") if per_layer else None
        )
        o.update(
            sliding_window_size=int(cfg["sliding_window"]),
            final_logits_soft_cap=float(cfg.get("final_logit_softcapping") or 0.0),
            local_rope_max_timescale=float(local.get("rope_theta", 10000.0)),
            global_rope_max_timescale=float(full.get("rope_theta", 1e6)),
            rope_max_timescale=float(full.get("rope_theta", 1e6)),
            local_rope_proportion=float(local.get("partial_rotary_factor", 1.0)),
            global_rope_proportion=float(full.get("partial_rotary_factor", 1.0)),
            global_head_dim=int(g_head),
            global_num_kv_heads=int(g_kv or o["base_num_kv_heads"]),
            share_kv_projections=k_eq_v,
        )
        if decoder_block == "gemma4_small":  # models/gemma4_small.py: per-layer inputs, shared KV layers
            o.update(
                hidden_size_per_layer_input=int(cfg.get("hidden_size_per_layer_input") or 0),
                vocab_size_per_layer_input=int(cfg.get("vocab_size_per_layer_input") or 0),
                num_kv_shared_layers=int(cfg.get("num_kv_shared_layers") or 0),
                use_double_wide_mlp=bool(cfg.get("use_double_wide_mlp", False)),
            )
        if decoder_block == "gemma4" and cfg.get("enable_moe_block"):  # Gemma4MoE (26b): a shared expert of
            # base_mlp_dim and the routed ones (gemma4-26b.yml: shared_experts 1, norm_topk_prob true)
            o.update(
                num_experts=int(cfg["num_experts"]),
                num_experts_per_tok=int(cfg["top_k_experts"]),
                base_moe_mlp_dim=int(cfg["moe_intermediate_size"]),
                shared_experts=1,
                norm_topk_prob=True,
            )
        elif decoder_block == "gemma4":
            o["num_experts"] = 1  # the dense MLP, whatever the model name's yml says
    elif decoder_block == "llama4":
        # models/llama4.py: MoE every interleave_moe_layer_step-th layer (routed + shared expert of moe_mlp_dim),
        # dense layers of mlp_dim (Maverick's intermediate_size_mlp), chunked attention on RoPE layers; the NoPE
        # interval (4) and the temperature-tuning constants are the yml's / hard-coded
        step = int(cfg.get("interleave_moe_layer_step") or 1)
        o.update(
            num_experts=int(cfg["num_local_experts"]),
            num_experts_per_tok=int(cfg["num_experts_per_tok"]),
            base_moe_mlp_dim=int(cfg["intermediate_size"]),
            base_mlp_dim=int(cfg["intermediate_size_mlp"] if step > 1 else cfg["intermediate_size"]),
            interleave_moe_layer_step=step,
            shared_experts=1,
            use_qk_norm=bool(cfg.get("use_qk_norm", False)),
            chunk_attn_window_size=int(cfg.get("attention_chunk_size") or 0),
            # MaxText's llama3 frequency scaling uses its own constants (factor 8, 1 / 4, 8192), Scout's
            rope_use_scale=rp.get("rope_type", rp.get("type")) == "llama3",
        )
    elif decoder_block == "olmo3":
        # one rope for every layer (models/olmo3.py passes config.rope_type to all of them): the full-attention layers'
        full = dict(rp.get("full_attention") or rp)
        o["sliding_window_size"] = int(cfg["sliding_window"])
        o["rope_max_timescale"] = float(full.get("rope_theta", cfg.get("rope_theta", 500000.0)))
        if full.get("rope_type", full.get("type")) == "yarn":
            o.update(
                rope_type="yarn",
                rope_factor=float(full["factor"]),
                beta_fast=float(full.get("beta_fast") or 32),
                beta_slow=float(full.get("beta_slow") or 1),
                rope_truncate=True,
                rope_attention_scaling=True,
                original_max_position_embeddings=int(full["original_max_position_embeddings"]),
                max_position_embeddings=int(cfg["max_position_embeddings"]),
            )
        else:
            o["rope_type"] = "default"
    return o


# ---------------------------------------------------------------------------------------------------------
# checkpoint inspection (shapes only)
# ---------------------------------------------------------------------------------------------------------


def checkpoint_shapes(path: str) -> dict:
    """{'/'-joined path under params/params: shape} from the Orbax metadata (no array is read)."""
    import jax
    import orbax.checkpoint as ocp

    meta = ocp.PyTreeCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    out = {}
    # DeepSeek-V4's non-Param variables are written beside params as MaxText's converter writes them
    # (params/Tid2EidVar/..., params/MoEBiasVar/...), under the same paths
    for collection, params in tree["params"].items():
        flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: hasattr(x, "shape"))[0]
        out |= {"/".join(str(getattr(k, "key", k)) for k in kp): tuple(v.shape) for kp, v in flat}
    return out


def read_ids(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        ids = np.load(path)
    else:
        with open(path) as f:
            ids = np.array([int(t) for t in f.read().replace(",", " ").split()])
    return np.asarray(ids, dtype=np.int32).reshape(-1)


# ---------------------------------------------------------------------------------------------------------
# MaxText forward pass
# ---------------------------------------------------------------------------------------------------------


def maxtext_logits(ckpt: str, model_name: str, overrides: dict, ids: np.ndarray, ckpt_shapes: dict) -> np.ndarray:
    import jax
    import jax.numpy as jnp
    from maxtext.common.common_types import DECODING_ACTIVE_SEQUENCE_INDICATOR, MODEL_MODE_TRAIN
    from maxtext.configs import pyconfig
    from maxtext.utils import maxtext_utils, model_creation_utils

    T = int(ids.shape[0])
    settings = {
        "model_name": model_name,
        "override_model_config": True,  # let the tiny dimensions replace the model yml's
        "load_parameters_path": ckpt,
        "hardware": "cpu",
        "skip_jax_distributed_system": True,
        "enable_checkpointing": False,
        "async_checkpointing": False,
        "per_device_batch_size": 1,
        "max_target_length": T,
        "max_prefill_predict_length": T,
        "dtype": "float32",
        "weight_dtype": "float32",
        "matmul_precision": "highest",
        "attention": "dot_product",
        "enable_dropout": False,
        "sparse_matmul": False,  # dense (dropless with capacity_factor -1) MoE path; megablox is a TPU kernel
        "megablox": False,
        "capacity_factor": -1.0,
        "run_name": "maxtext_logits",
        "base_output_directory": "/tmp/maxtext_logits_output",
        **overrides,
    }
    argv = [sys.argv[0]] + [f"{k}={_cli(v)}" for k, v in settings.items()]
    config = pyconfig.initialize(argv)

    devices = maxtext_utils.create_device_mesh(config)
    mesh = jax.sharding.Mesh(devices, config.mesh_axes)
    # what MaxText's tests/utils/forward_pass_logit_checker.py does (NNX decoder): build + restore in one call
    model = model_creation_utils.from_pretrained(config, mesh=mesh, model_mode=MODEL_MODE_TRAIN)
    restore_collections(model, ckpt)
    check_loaded(model, ckpt_shapes)

    batch = int(config.global_batch_size_to_train_on)  # 1 on one CPU device
    tokens = jnp.asarray(np.tile(ids[None, :], (batch, 1)))
    positions = jnp.asarray(np.tile(np.arange(T, dtype=np.int32)[None, :], (batch, 1)))
    segments = jnp.full((batch, T), DECODING_ACTIVE_SEQUENCE_INDICATOR, dtype=jnp.int32)
    with jax.set_mesh(mesh):
        logits = model(
            decoder_input_tokens=tokens, decoder_positions=positions, decoder_segment_ids=segments, enable_dropout=False
        )
    return np.asarray(logits[0], dtype=np.float32)


def restore_collections(model, ckpt: str) -> None:
    """The variables stored beside `params/params` (DeepSeek-V4's `params/Tid2EidVar`, `params/MoEBiasVar`, as
    MaxText's converter writes them and its `checkpointing.load_params_from_path` reads them): `from_pretrained`
    restores `params/params` only and leaves those variables deleted, so they are read here and set by path."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    stored = ocp.PyTreeCheckpointer().metadata(ckpt)
    tree = getattr(getattr(stored, "item_metadata", stored), "tree", stored)
    if set(tree["params"]) == {"params"}:
        return
    restored = ocp.PyTreeCheckpointer().restore(ckpt)["params"]
    flat = {}
    for collection, sub in restored.items():
        if collection != "params":
            for kp, v in jax.tree_util.tree_flatten_with_path(sub)[0]:
                flat["/".join(str(getattr(k, "key", k)) for k in kp)] = v
    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        key = "/".join(str(k) for k in path)
        if key in flat:
            var.set_value(jnp.asarray(flat.pop(key), var.get_value().dtype))
    nnx.update(model, state)
    if flat:
        raise SystemExit(f"checkpoint variables the model does not have: {sorted(flat)[:5]}")
    print("restored the non-params collections by path", file=sys.stderr)


def check_loaded(model, ckpt_shapes: dict) -> None:
    """Fail unless every model parameter came from the checkpoint with its exact shape.

    MaxText's `from_pretrained` tolerates mismatches: parameters missing from the checkpoint keep their random
    initialization (unless > 80% are missing), checkpoint-only arrays are dropped, and differing shapes are
    repeated / zero-padded to fit. Any of these would make the comparison meaningless.
    """
    from flax import nnx

    # the persistent variables, as from_pretrained selects them (e.g. DeepSeek's routing bias is not an nnx.Param)
    state = nnx.state(model).filter(
        lambda path, var: not isinstance(var, (nnx.RngState, nnx.Cache, nnx.Intermediate, nnx.BatchStat))
    )
    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    model_shapes = {
        "/".join(str(k) for k in path): tuple(v.get_value().shape if hasattr(v, "get_value") else v.value.shape)
        for path, v in flat
    }
    missing = sorted(set(model_shapes) - set(ckpt_shapes))
    unused = sorted(set(ckpt_shapes) - set(model_shapes))
    common = set(model_shapes) & set(ckpt_shapes)
    # from_pretrained transposes a 2-D array stored with its axes reversed (_align_checkpoint_to_model_shapes);
    # MaxText's own converter writes DeepSeek-V3's scanned routing bias (a MoEBiasVar, stacked by NNX on axis 0)
    # as [experts, layers], so this case is part of MaxText's loading contract
    transposed = sorted(
        k
        for k in common
        if len(ckpt_shapes[k]) == 2 and model_shapes[k] != ckpt_shapes[k] and model_shapes[k] == ckpt_shapes[k][::-1]
    )
    for k in transposed:
        print(
            f"note: {k} stored {ckpt_shapes[k]}, model {model_shapes[k]}: MaxText transposes it on load",
            file=sys.stderr,
        )
    reshaped = sorted(k for k in common if model_shapes[k] != ckpt_shapes[k] and k not in transposed)
    problems = [
        f"model parameter not in checkpoint (left randomly initialized): {k} {model_shapes[k]}" for k in missing
    ]
    problems += [f"checkpoint array not used by the model: {k} {ckpt_shapes[k]}" for k in unused]
    problems += [f"shape differs: {k} checkpoint {ckpt_shapes[k]} model {model_shapes[k]}" for k in reshaped]
    if problems:
        raise SystemExit("checkpoint does not fit the MaxText model exactly:\n  " + "\n  ".join(problems))
    print(
        f"all {len(model_shapes)} model parameters restored from the checkpoint with matching shapes", file=sys.stderr
    )


def _cli(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_cli(x) for x in v) + "]"
    return str(v)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maxtext", required=True, help="Orbax checkpoint item dir (OUT/0/items)")
    ap.add_argument("--hf-config", required=True, help="HF config.json the checkpoint was converted from")
    ap.add_argument("--model-name", required=True, help="MaxText base model name, e.g. llama3.1-8b")
    ap.add_argument("--ids", required=True, help="token ids: .npy or a text file of integers")
    ap.add_argument("--out", required=True, help="output .npy: float32 logits [T, vocab]")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra MaxText override (last word)"
    )
    args = ap.parse_args(argv)

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import yaml
    from maxtext.utils.globals import MAXTEXT_CONFIGS_DIR  # the installed package's configs/

    with open(os.path.join(MAXTEXT_CONFIGS_DIR, "models", f"{args.model_name}.yml")) as f:
        decoder_block = yaml.safe_load(f)["decoder_block"]
    with open(args.hf_config) as f:
        hf_cfg = json.load(f)
    ckpt = os.path.abspath(args.maxtext)
    shapes = checkpoint_shapes(ckpt)
    # unscanned checkpoints hold decoder/layers_<i>, dense_layers_<i>, moe_layers_<i> (scanned: stacked
    # decoder/layers, dense_layers, moe_layers; Gemma3 adds decoder/layers_remainder)
    scanned = not any(re.match(r"decoder/(\w+_)?layers_\d+/", k) for k in shapes)
    # DeepSeek-V4 keeps its hash-routed prefix unscanned (decoder/layers_<i>) beside decoder/scanned_blocks
    scanned = scanned or any(k.startswith("decoder/scanned_blocks/") for k in shapes)
    overrides = overrides_from_hf(
        hf_cfg, decoder_block, ckpt_vocab=shapes["token_embedder/embedding"][0], scanned=scanned
    )
    for kv in args.set:
        k, _, v = kv.partition("=")
        overrides[k] = yaml.safe_load(v)
    print(
        json.dumps({"model_name": args.model_name, "decoder_block": decoder_block, "overrides": overrides}),
        file=sys.stderr,
    )

    ids = read_ids(args.ids)
    logits = maxtext_logits(ckpt, args.model_name, overrides, ids, shapes)
    np.save(args.out, logits)
    print(f"saved {args.out}: logits {logits.shape} {logits.dtype}", file=sys.stderr)


if __name__ == "__main__":
    main()

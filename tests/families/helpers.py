"""Test helpers shared by the family tests (import as `tests.families.helpers`).

`model_cache` builds the cached tiny HF models behind each test module's `hf_model` fixture;
`hf_tensors` / `bits` / `assert_bit_exact` / `round_trip` are the round-trip checks every family test needs;
`exported_logits` runs transformers on a source folder and on its float32 export;
`attention_kernels` / `qk_norms` / `mlp_kernels` / `gemma4_layer` lay one HF layer's tensors out as MaxText arrays;
`deepseek_layout` / `deepseek4_layout` / `qwen3_next_layout` lay HF tensors out as MaxText arrays with plain numpy,
independently of the converter, as MaxText's own converters lay them out (`convert_deepseek_family_ckpt.py` /
`convert_qwen3_next_scanned.py` under src/maxtext/checkpoint_conversion/standalone_scripts/ in AI-Hypercomputer/maxtext;
DeepSeek-V4: the DEEPSEEK_V4 mapping and hooks of checkpoint_conversion/utils/param_mapping.py), for the family and
verification tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converters.convert import hf_to_maxtext, maxtext_to_hf
from converters.io.orbax import read_params
from converters.io.safetensors import SafetensorsFolder
from converters.tiny_models import make_test_model

# A 40-token prompt of ids below every tiny vocabulary (512), varied enough for windows and RoPE to act.
_PROMPT = (
    "1 5 77 300 12 499 3 8 250 100 42 7 19 201 64 33 2 480 91 15 "
    "6 311 128 70 9 44 10 399 26 57 81 140 222 5 18 73 260 31 444 4"
)
IDS = [[int(t) for t in _PROMPT.split()]]


def model_cache(tmp_path_factory, family: str, layers: int):
    """Body of a module-scoped `hf_model` fixture: `make(dtype="bfloat16")` -> a tiny HF folder, built once per
    dtype."""
    cache: dict = {}

    def make(dtype: str = "bfloat16"):
        if dtype not in cache:
            cache[dtype] = make_test_model(
                family, tmp_path_factory.mktemp(f"{family}-{dtype}") / "model", layers=layers, dtype=dtype
            )
        return cache[dtype]

    return make


def hf_tensors(path) -> dict:
    f = SafetensorsFolder(path)
    return {n: f.read(n) for n in f.tensors}


def bits(a: np.ndarray) -> np.ndarray:
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bit_exact(a: dict, b: dict):
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (
            k,
            a[k].dtype,
            b[k].dtype,
            a[k].shape,
            b[k].shape,
        )
        assert np.array_equal(bits(a[k]), bits(b[k])), f"{k} not bit-exact"


def ulp_distance(a: np.ndarray, b: np.ndarray) -> int:
    assert a.dtype == b.dtype and a.shape == b.shape
    ints = {2: np.int16, 4: np.int32}[a.dtype.itemsize]
    return int(np.abs(a.view(ints).astype(np.int64) - b.view(ints).astype(np.int64)).max())


def assert_close(a: dict, b: dict, scaled: str) -> int:
    """Tensors of two folders or trees bit-exact except names ending in `scaled` (<= 1 ulp); returns the largest
    ulp distance seen there."""
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    worst = 0
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        d = ulp_distance(a[k], b[k])
        if k.endswith(scaled):
            assert d <= 1, k
            worst = max(worst, d)
        else:
            assert d == 0, f"{k} not bit-exact"
    return worst


def round_trip(src: Path, tmp: Path, *, scan: bool, dtype: str = "bfloat16", **kw) -> tuple[dict, dict]:
    """HF -> MaxText -> HF -> MaxText; asserts both HF folders and both checkpoints are bit-identical.
    Returns (MaxText params, HF tensors) of the first pass."""
    hf_to_maxtext(src, tmp / "mt", scan=scan, dtype=dtype, **kw)
    maxtext_to_hf(tmp / "mt", tmp / "hf", dtype=dtype)
    first, back = hf_tensors(src), hf_tensors(tmp / "hf")
    assert_bit_exact(first, back)
    hf_to_maxtext(tmp / "hf", tmp / "mt2", scan=scan, dtype=dtype, **kw)
    params = read_params(tmp / "mt")
    assert_bit_exact(params, read_params(tmp / "mt2"))
    return params, first


def exported_logits(src: Path, tmp: Path, ids: list[list[int]], *, scan: bool):
    """float32 HF -> MaxText -> HF (`tmp/mt`, `tmp/hf`); returns transformers' (source, exported) logits on `ids`."""
    import torch
    from transformers import AutoModelForCausalLM

    hf_to_maxtext(src, tmp / "mt", scan=scan, dtype="float32")
    maxtext_to_hf(tmp / "mt", tmp / "hf", dtype="float32")
    ids = torch.tensor(ids)
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32)(ids).logits
    return want, got


# config fields every exported text config carries over as the source had them (each family's test adds its own)
CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "rope_parameters",
    "rms_norm_eps",
    "sliding_window",
    "max_position_embeddings",
)


def assert_config_kept(a, b, *keys: str) -> None:
    """Exported config `b` has source config `a`'s value for every field of CONFIG_KEYS and `keys`."""
    for key in CONFIG_KEYS + keys:
        assert getattr(b, key) == getattr(a, key), key


def attention_kernels(hf: dict, a: str, e: int, n: int, kv: int, d: int, module: str = "self_attention") -> dict:
    """The q/k/v/o projections under HF prefix `a` (`model.layers.<i>.self_attn.`) as MaxText's
    `<module>/{query,key,value,out}/kernel`: [E, N, D], [E, KV, D] twice, [N, D, E] (transposed, then reshaped)."""
    return {
        f"{module}/query/kernel": hf[a + "q_proj.weight"].T.reshape(e, n, d),
        f"{module}/key/kernel": hf[a + "k_proj.weight"].T.reshape(e, kv, d),
        f"{module}/value/kernel": hf[a + "v_proj.weight"].T.reshape(e, kv, d),
        f"{module}/out/kernel": hf[a + "o_proj.weight"].T.reshape(n, d, e),
    }


def qk_norms(hf: dict, a: str, module: str = "self_attention") -> dict:
    """The q/k norm weights under HF prefix `a` as MaxText's `<module>/{query,key}_norm/scale`, as they are."""
    return {f"{module}/query_norm/scale": hf[a + "q_norm.weight"], f"{module}/key_norm/scale": hf[a + "k_norm.weight"]}


def mlp_kernels(hf: dict, m: str, module: str = "mlp") -> dict:
    """The gated MLP under HF prefix `m` (`model.layers.<i>.mlp.`) as MaxText's `<module>/{wi_0,wi_1,wo}/kernel`
    (gate, up, down; transposed)."""
    names = (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj"))
    return {f"{module}/{mt}/kernel": hf[f"{m}{name}.weight"].T for mt, name in names}


def gemma4_layer(hf: dict, i: int, e: int, n: int, kv: int, d: int) -> dict:
    """MaxText arrays of Gemma 4 HF layer i (src/maxtext/models/gemma4.py / gemma4_small.py names) with numpy,
    independently of the converter: plain norms (no +1), q/k/v/o with this layer's kv heads and head_dim; key,
    key_norm and value only where HF has them (KV-shared layers have none; global layers with attention_k_eq_v no
    v_proj: callers assert which); with a router (26b, models/gemma4.py Gemma4MoE): the dense MLP is the shared
    expert, HF's fused experts.gate_up_proj [X, 2F, E] is cut in halves (gate rows, then up rows)."""
    p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    out = {
        "pre_self_attention_norm/scale": hf[p + "input_layernorm.weight"],
        "post_self_attention_norm/scale": hf[p + "post_attention_layernorm.weight"],
        "pre_ffw_norm/scale": hf[p + "pre_feedforward_layernorm.weight"],
        "post_ffw_norm/scale": hf[p + "post_feedforward_layernorm.weight"],
        "self_attention/query_norm/scale": hf[a + "q_norm.weight"],
        "self_attention/query/kernel": hf[a + "q_proj.weight"].T.reshape(e, n, d),
        "self_attention/out/kernel": hf[a + "o_proj.weight"].T.reshape(n, d, e),
        "layer_scalar": hf[p + "layer_scalar"],
    }
    if a + "k_proj.weight" in hf:
        out["self_attention/key_norm/scale"] = hf[a + "k_norm.weight"]
        out["self_attention/key/kernel"] = hf[a + "k_proj.weight"].T.reshape(e, kv, d)
    if a + "v_proj.weight" in hf:
        out["self_attention/value/kernel"] = hf[a + "v_proj.weight"].T.reshape(e, kv, d)
    if p + "router.proj.weight" not in hf:
        return out | mlp_kernels(hf, p + "mlp.")
    moe = "mlp/moe_block/MoeBlock_0"
    gate_up = hf[p + "experts.gate_up_proj"]
    half = gate_up.shape[1] // 2
    norms = ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2")
    return (
        out
        | mlp_kernels(hf, p + "mlp.", "mlp/moe_block/shared_experts")
        | {
            **{f"mlp/{k}/scale": hf[f"{p}{k}.weight"] for k in norms},
            "mlp/pre_forward_scale_2": hf[p + "router.scale"],
            f"{moe}/gate/kernel": hf[p + "router.proj.weight"].T,
            f"{moe}/per_expert_scale": hf[p + "router.per_expert_scale"],
            f"{moe}/wi_0": gate_up[:, :half].transpose(0, 2, 1),
            f"{moe}/wi_1": gate_up[:, half:].transpose(0, 2, 1),
            f"{moe}/wo": hf[p + "experts.down_proj"].transpose(0, 2, 1),
        }
    )


def deepseek_layout(hf: dict, cfg: dict, scan: bool) -> dict:
    """DeepSeek V2/V3/V3.2 HF tensors -> MaxText arrays (dense_layers / moe_layers stacks), plain numpy."""
    e, h = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v, c = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    q_lora, k, n = cfg.get("q_lora_rank"), cfg["first_k_dense_replace"], cfg["num_hidden_layers"]
    out = {
        "token_embedder/embedding": hf["model.embed_tokens.weight"],
        "decoder/decoder_norm/scale": hf["model.norm.weight"],
        "decoder/logits_dense/kernel": hf["lm_head.weight"].T,
    }
    layers = []
    for i in range(n):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        lay = {
            "pre_self_attention_layer_norm/scale": hf[p + "input_layernorm.weight"],
            "post_self_attention_layer_norm/scale": hf[p + "post_attention_layernorm.weight"],
            "self_attention/wkv_a/kernel": hf[a + "kv_a_proj_with_mqa.weight"].T,
            "self_attention/kv_norm/scale": hf[a + "kv_a_layernorm.weight"],
            "self_attention/wkv_b/kernel": hf[a + "kv_b_proj.weight"].T.reshape(c, h, nope + v),
            "self_attention/out/kernel": hf[a + "o_proj.weight"].T.reshape(h, v, e),
        }
        if cfg.get("index_n_heads"):  # V3.2 indexer
            ih, idim, x = cfg["index_n_heads"], cfg["index_head_dim"], a + "indexer."
            lay["self_attention/indexer/wq_b/kernel"] = hf[x + "wq_b.weight"].T.reshape(q_lora, ih, idim)
            lay["self_attention/indexer/wk/kernel"] = hf[x + "wk.weight"].T
            lay["self_attention/indexer/k_norm/scale"] = hf[x + "k_norm.weight"]
            lay["self_attention/indexer/k_norm/bias"] = hf[x + "k_norm.bias"]
            lay["self_attention/indexer/weights_proj/kernel"] = hf[x + "weights_proj.weight"].T
        if q_lora:
            lay["self_attention/wq_a/kernel"] = hf[a + "q_a_proj.weight"].T
            lay["self_attention/q_norm/scale"] = hf[a + "q_a_layernorm.weight"]
            lay["self_attention/wq_b/kernel"] = hf[a + "q_b_proj.weight"].T.reshape(q_lora, h, nope + rope)
        else:
            lay["self_attention/query/kernel"] = hf[a + "q_proj.weight"].T.reshape(e, h, nope + rope)
        if i < k:
            for mt, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
                lay[f"mlp/{mt}/kernel"] = hf[f"{m}{name}.weight"].T
        else:
            moe = "DeepSeekMoeBlock_0"
            lay[f"{moe}/MoeBlock_0/gate/kernel"] = hf[m + "gate.weight"].T
            if m + "gate.e_score_correction_bias" in hf:
                lay[f"{moe}/MoeBlock_0/gate/bias"] = hf[m + "gate.e_score_correction_bias"]
            for mt, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
                lay[f"{moe}/MoeBlock_0/{mt}"] = np.stack(
                    [hf[f"{m}experts.{x}.{name}.weight"].T for x in range(cfg["n_routed_experts"])]
                )
                lay[f"{moe}/shared_experts/{mt}/kernel"] = hf[f"{m}shared_experts.{name}.weight"].T
        layers.append(lay)
    for group, rng in (("dense_layers", range(k)), ("moe_layers", range(k, n))):
        group_layers = [layers[i] for i in rng]
        if not group_layers:
            continue
        if scan:
            out.update(
                {
                    f"decoder/{group}/{key}": np.stack([lay[key] for lay in group_layers], axis=1)
                    for key in group_layers[0]
                }
            )
        else:
            out.update(
                {f"decoder/{group}_{j}/{key}": val for j, lay in enumerate(group_layers) for key, val in lay.items()}
            )
    return out


def qwen3_next_layout(hf: dict, cfg: dict, scan: bool, legacy: bool = False) -> dict:
    """Qwen3-Next HF tensors -> MaxText arrays, plain numpy. Scanned as MaxText 0.2.5 stacks one block per cycle
    (src/maxtext/models/qwen3.py Qwen3NextScannableBlock, src/maxtext/layers/nnx_scan.py create_scanned_layers: each
    scan stacks on axis 1, the inner one first): HF layer b*c + p at [:, b, p] of `decoder/layers/local_layers/*` for
    p < c - 1, at [:, b] of `decoder/layers/global_layer/*` for p = c - 1. `legacy`: the older `layer_<p>` stacks
    (HF layer i in stack i % c, at i // c)."""
    e, n, kv, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    c, layers = cfg.get("full_attention_interval", 4), cfg["num_hidden_layers"]
    out = {
        "token_embedder/embedding": hf["model.embed_tokens.weight"],
        "decoder/decoder_norm/scale": hf["model.norm.weight"],
        "decoder/logits_dense/kernel": hf["lm_head.weight"].T,
    }
    per_layer = []
    for i in range(layers):
        p, m = f"model.layers.{i}.", f"model.layers.{i}.mlp."
        lay = {
            "input_layernorm/scale": hf[p + "input_layernorm.weight"],
            "post_attention_layernorm/scale": hf[p + "post_attention_layernorm.weight"],
            "mlp/routed_experts/gate/kernel": hf[m + "gate.weight"].T,
            "mlp/shared_expert_gate/kernel": hf[m + "shared_expert_gate.weight"].T,
        }
        for mt, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
            lay[f"mlp/routed_experts/{mt}"] = np.stack(
                [hf[f"{m}experts.{x}.{name}.weight"].T for x in range(cfg["num_experts"])]
            )
            lay[f"mlp/shared_expert/{mt}/kernel"] = hf[f"{m}shared_expert.{name}.weight"].T
        if (i + 1) % c == 0:
            a = p + "self_attn."
            lay |= {
                "attention/attention/query/kernel": hf[a + "q_proj.weight"].T.reshape(e, n, 2 * d),
                "attention/attention/key/kernel": hf[a + "k_proj.weight"].T.reshape(e, kv, d),
                "attention/attention/value/kernel": hf[a + "v_proj.weight"].T.reshape(e, kv, d),
                "attention/attention/out/kernel": hf[a + "o_proj.weight"].T,
                "attention/attention/query_norm/scale": hf[a + "q_norm.weight"],
                "attention/attention/key_norm/scale": hf[a + "k_norm.weight"],
            }
        else:
            a = p + "linear_attn."
            lay |= {
                "attention/in_proj_qkvz/kernel": hf[a + "in_proj_qkvz.weight"].T,
                "attention/in_proj_ba/kernel": hf[a + "in_proj_ba.weight"].T,
                "attention/conv1d/kernel": np.transpose(hf[a + "conv1d.weight"], (2, 1, 0)),
                "attention/A_log": hf[a + "A_log"],
                "attention/dt_bias": hf[a + "dt_bias"],
                "attention/norm/rms_norm/scale": hf[a + "norm.weight"],
                "attention/out_proj/kernel": hf[a + "out_proj.weight"].T,
            }
        per_layer.append(lay)
    if scan and legacy:
        for b in range(c):
            group = per_layer[b::c]
            out.update({f"decoder/layers/layer_{b}/{k}": np.stack([lay[k] for lay in group], axis=1) for k in group[0]})
    elif scan:
        blocks = [per_layer[b : b + c] for b in range(0, layers, c)]
        for k in blocks[0][0]:
            inner = [np.stack([lay[k] for lay in block[:-1]], axis=1) for block in blocks]
            out[f"decoder/layers/local_layers/{k}"] = np.stack(inner, axis=1)
        for k in blocks[0][-1]:
            out[f"decoder/layers/global_layer/{k}"] = np.stack([block[-1][k] for block in blocks], axis=1)
    else:
        out.update({f"decoder/layers_{i}/{k}": v for i, lay in enumerate(per_layer) for k, v in lay.items()})
    return out


def deepseek4_ratios(cfg: dict) -> list[int]:
    """Each layer's compress ratio from transformers' saved config (`layer_types`, `compress_rates`)."""
    return [0 if t == "sliding_attention" else cfg["compress_rates"][t] for t in cfg["layer_types"]]


def deepseek4_layer_layout(hf: dict, cfg: dict, i: int) -> dict:
    """HF layer i (the published names) in MaxText's layout, by numpy."""
    p, n, emb = f"layers.{i}.", cfg["hc_mult"], cfg["hidden_size"]
    heads, head_dim, groups = cfg["num_attention_heads"], cfg["head_dim"], cfg["o_groups"]
    t = {
        "pre_self_attention_layer_norm/scale": hf[p + "attn_norm.weight"],
        "post_self_attention_layer_norm/scale": hf[p + "ffn_norm.weight"],
    }
    for mt, name in (("mhc_attention", "hc_attn"), ("mhc_mlp", "hc_ffn")):
        fn, base, scale = hf[p + name + "_fn"], hf[p + name + "_base"], hf[p + name + "_scale"]
        t |= {
            f"{mt}/pre_alpha": fn[:n].T,
            f"{mt}/post_alpha": fn[n : 2 * n].T,
            f"{mt}/res_alpha": fn[2 * n :].T,
            f"{mt}/pre_beta": base[:n],
            f"{mt}/post_beta": base[n : 2 * n],
            f"{mt}/res_beta": base[2 * n :].reshape(n, n),
            f"{mt}/pre_alpha_scale": scale[0:1],
            f"{mt}/post_alpha_scale": scale[1:2],
            f"{mt}/res_alpha_scale": scale[2:3],
            f"{mt}/mhc_norm/scale": np.ones(n * emb, np.float32),
        }
    a, s = p + "attn.", "self_attention/"
    wo_a = hf[a + "wo_a.weight"]  # [G*R, H*D/G]: group g's R rows
    t |= {
        s + "wq_a/kernel": hf[a + "wq_a.weight"].T,
        s + "q_norm/scale": hf[a + "q_norm.weight"],
        s + "wq_b/kernel": hf[a + "wq_b.weight"].T.reshape(-1, heads, head_dim),
        s + "wkv/kernel": hf[a + "wkv.weight"].T.reshape(emb, 1, head_dim),
        s + "kv_norm/scale": hf[a + "kv_norm.weight"],
        s + "sinks": hf[a + "attn_sink"],
        s + "o_a_proj/kernel": wo_a.reshape(groups, -1, wo_a.shape[1]).transpose(0, 2, 1),
        s + "o_b_proj/kernel": hf[a + "wo_b.weight"].T,
    }

    def compressor(mt: str, name: str) -> None:
        t.update(
            {
                f"{mt}/kv_proj/kernel": hf[name + "wkv.weight"].T,
                f"{mt}/gate_proj/kernel": hf[name + "wgate.weight"].T,
                f"{mt}/kv_norm/scale": hf[name + "norm.weight"],
                f"{mt}/position_bias": hf[name + "ape"],
            }
        )

    r = deepseek4_ratios(cfg)[i]
    if r == 4:
        compressor(s + "csa_compressor", a + "compressor.")
        compressor(s + "csa_compressor/indexer", a + "indexer.compressor.")
        t[s + "csa_compressor/indexer/q_proj/kernel"] = hf[a + "indexer.wq_b.weight"].T
        t[s + "csa_compressor/indexer/weights_proj/kernel"] = hf[a + "indexer.weights_proj.weight"].T
    elif r:
        compressor(s + "hca_compressor", a + "compressor.")
    f, moe = p + "ffn.", "mlp/MoeBlock_0/"
    t[moe + "gate/kernel"] = hf[f + "gate.weight"].T
    if f + "gate.tid2eid" in hf:
        t[moe + "tid2eid"] = hf[f + "gate.tid2eid"].astype(np.float32)
    else:
        t[moe + "gate/bias"] = hf[f + "gate.bias"]
    for mt, w in (("wi_0", "w1"), ("wi_1", "w3"), ("wo", "w2")):
        t[moe + mt] = np.stack([hf[f"{f}experts.{e}.{w}.weight"].T for e in range(cfg["n_routed_experts"])])
        t[f"mlp/shared_experts/{mt}/kernel"] = hf[f"{f}shared_experts.{w}.weight"].T
    return t


def deepseek4_layout(hf: dict, cfg: dict, scan: bool, layers: list[dict] | None = None) -> dict:
    """The whole checkpoint: the hash-routed layers always `decoder/layers_<i>`; scanned, the rest stacked in
    `decoder/scanned_blocks/layers_0` (HCA) / `layers_1` (CSA) on axis 1 (the MoEBiasVar gate bias on axis 0)."""
    layers = layers or [deepseek4_layer_layout(hf, cfg, i) for i in range(cfg["num_hidden_layers"])]
    out = {
        "token_embedder/embedding": hf["embed.weight"],
        "decoder/decoder_norm/scale": hf["norm.weight"],
        "decoder/logits_dense/kernel": hf["head.weight"].T,
        "decoder/hc_head/hc_fn": hf["hc_head_fn"].T,
        "decoder/hc_head/hc_base": hf["hc_head_base"],
        "decoder/hc_head/hc_scale": hf["hc_head_scale"],
    }
    hashed = sum(1 for x in cfg["mlp_layer_types"] if x == "hash_moe")
    for i, t in enumerate(layers):
        if not scan or i < hashed:
            out |= {f"decoder/layers_{i}/{k}": v for k, v in t.items()}
    if scan:
        for s in (0, 1):
            block = layers[hashed + s :: 2]
            for k in block[0]:
                axis = 0 if k.endswith("gate/bias") else 1
                out[f"decoder/scanned_blocks/layers_{s}/{k}"] = np.stack([lay[k] for lay in block], axis=axis)
    return out

"""Synthetic DeepSeek-V4 quantized sources for tests: a plain (bf16 / float32) DeepSeek-V4 folder with the published
tensor names in, its quantized twin out, laid out as deepseek-ai/DeepSeek-V4-Flash ships it (the format is described in
converters/io/quantized_fp8.py; this code is written from that description, not from ckptflow's decoder):

  * FP8 linears -- `layers.<i>.attn.{wq_a,wq_b,wkv,wo_a,wo_b}`, `layers.<i>.attn.indexer.wq_b`,
    `layers.<i>.ffn.shared_experts.{w1,w2,w3}`, `mtp.<j>.{e_proj,h_proj}` (and the same under `mtp.<j>.`) -- become
    `F8_E4M3` with a `<m>.scale` `F8_E8M0` `[ceil(M/128), ceil(N/128)]`: per 128x128 block, the power of two
    2^ceil(log2(amax / 448)) (1 for an all-zero block), values rounded to the nearest e4m3;
  * routed experts `...ffn.experts.<e>.w{1,2,3}.weight` `[out, in]` become FP4 E2M1 packed two per byte as `I8`
    `[out, in/2]` (even input in the low nibble) with a `<m>.scale` `F8_E8M0` `[out, in/32]`: per 32 inputs of a row,
    2^ceil(log2(amax / 6)), values rounded to the nearest E2M1 value;
  * everything else is copied unchanged; config.json gains the published `quantization_config` and `expert_dtype`.

`write_quantized_twin(src, dest, twin=...)` also writes the dequantized twin: the plain folder with every quantized
tensor replaced by bf16(fp32(quantized value) * scale), the values the decoder must reproduce bit for bit.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from converters.io.quantized_fp8 import V4_FP4_EXPERT, V4_FP8_LINEAR
from converters.io.safetensors import INDEX_NAME, SafetensorsFolder, save_file

BF16 = np.dtype(ml_dtypes.bfloat16)
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
FP8_MAX = 448.0
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)  # magnitudes of codes 0..7; bit 3 is the sign
BLOCK = 128
GROUP = 32
# deepseek-ai/DeepSeek-V4-Flash's config.json
V4_QUANTIZATION = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [BLOCK, BLOCK],
}
FP8_LINEAR, ROUTED_EXPERT = V4_FP8_LINEAR, V4_FP4_EXPERT  # which tensors the published checkpoint quantizes


def e8m0(exponent: np.ndarray) -> np.ndarray:
    """Powers of two 2^k as E8M0 bytes (k + 127)."""
    return (np.asarray(exponent, np.int32) + 127).astype(np.uint8).view(E8M0)


def _pow2_at_least(x: np.ndarray) -> np.ndarray:
    """The exponent k of the smallest power of two 2^k >= x (x > 0), 0 where x == 0."""
    safe = np.where(x > 0, x, 1.0)
    mant, exp = np.frexp(safe)  # safe = mant * 2^exp, mant in [0.5, 1)
    k = np.where(mant == 0.5, exp - 1, exp)
    return np.clip(np.where(x > 0, k, 0), -127, 127).astype(np.int32)


def quantize_fp8_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float `[M, N]` -> (e4m3 `[M, N]`, E8M0 `[ceil(M/128), ceil(N/128)]`, dequantized bf16 `[M, N]`)."""
    m, n = w.shape
    gm, gn = -(-m // BLOCK), -(-n // BLOCK)
    padded = np.zeros((gm * BLOCK, gn * BLOCK), np.float32)
    padded[:m, :n] = w.astype(np.float32)
    amax = np.abs(padded.reshape(gm, BLOCK, gn, BLOCK)).max(axis=(1, 3))
    k = _pow2_at_least(amax / FP8_MAX)
    full = np.ldexp(np.float32(1), np.repeat(np.repeat(k, BLOCK, 0), BLOCK, 1)[:m, :n]).astype(np.float32)
    q = np.clip(w.astype(np.float32) / full, -FP8_MAX, FP8_MAX).astype(FP8)
    return q, e8m0(k), (q.astype(np.float32) * full).astype(BF16)


def quantize_fp4_groups(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float `[out, in]` -> (int8 `[out, in/2]`, E8M0 `[out, in/32]`, dequantized bf16 `[out, in]`)."""
    out_dim, in_dim = w.shape
    x = w.astype(np.float32).reshape(out_dim, in_dim // GROUP, GROUP)
    k = _pow2_at_least(np.abs(x).max(axis=-1) / 6.0)
    factor = np.ldexp(np.float32(1), k)[..., None].astype(np.float32)
    scaled = x / factor
    idx = np.abs(np.abs(scaled)[..., None] - E2M1).argmin(axis=-1)
    negative = np.signbit(scaled) & (idx > 0)
    codes = (idx | np.where(negative, 8, 0)).astype(np.uint8).reshape(out_dim, in_dim)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8).view(np.int8)
    values = np.where(negative, -E2M1[idx], E2M1[idx]) * factor
    return packed, e8m0(k), values.reshape(out_dim, in_dim).astype(BF16)


def write_quantized_twin(src: Path, dest: Path, twin: Path | None = None) -> Path:
    """Write `src`'s quantized twin to `dest` (one shard and its index, as MaxText's deepseek_dequantize.py wants) and,
    with `twin`, the dequantized bf16 values under the plain names; return `dest`."""
    folder = SafetensorsFolder(src)
    quantized, plain = {}, {}
    for name in folder.tensors:
        t = folder.read(name)
        base = name[: -len(".weight")]
        if ROUTED_EXPERT.search(name):
            quantized[name], quantized[base + ".scale"], plain[name] = quantize_fp4_groups(t)
        elif FP8_LINEAR.search(name):
            quantized[name], quantized[base + ".scale"], plain[name] = quantize_fp8_blocks(t)
        else:
            quantized[name] = plain[name] = np.array(t)
    cfg = json.loads((Path(src) / "config.json").read_text())
    for out, tensors, extra in (
        (dest, quantized, {"quantization_config": V4_QUANTIZATION, "expert_dtype": "fp4"}),
        (twin, plain, {}),
    ):
        if out is None:
            continue
        out = Path(out)
        out.mkdir(parents=True)
        save_file(out / "model.safetensors", tensors)
        index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in tensors}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
        plain_cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "expert_dtype")}
        (out / "config.json").write_text(json.dumps({**plain_cfg, **extra}, indent=2))
        for extra_file in Path(src).glob("*.json"):
            if extra_file.name not in ("config.json", INDEX_NAME) and not (out / extra_file.name).exists():
                shutil.copy(extra_file, out / extra_file.name)
    return Path(dest)


# ---- a tiny plain DeepSeek-V4 under the published names -------------------------------------------------------------
# transformers 5.24's DeepseekV4ForCausalLM names -> the published ones (the reverse of its conversion_mapping.py
# "deepseek_v4" renames); its fused experts are split per expert (gate_up_proj [E, 2F, D] = w1 rows then w3 rows)
TINY_V4 = dict(
    vocab_size=512,
    hidden_size=256,
    moe_intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=2,
    head_dim=128,
    qk_rope_head_dim=64,
    q_lora_rank=128,
    n_routed_experts=4,
    num_experts_per_tok=2,
    o_groups=2,
    o_lora_rank=128,
    index_n_heads=2,
    index_head_dim=64,
    index_topk=8,
    layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
    mlp_layer_types=["hash_moe", "moe", "moe"],
    num_nextn_predict_layers=0,
    sliding_window=16,
)
_RENAMES = [
    (r"^model\.embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^model\.norm\.", "norm."),
    (r"^model\.hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"^model\.layers\.", "layers."),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.sinks$", ".attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.position_bias$", ".ape"),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.wgate\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
]
FLOAT32_PUBLISHED = re.compile(r"(attn_sink|\.ape|hc_head_\w+|hc_(attn|ffn)_\w+|\.gate\.bias)$")


def published_name(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def write_tiny_plain_v4(dest: Path, seed: int = 0, **overrides) -> Path:
    """A random tiny DeepSeek-V4 (transformers' DeepseekV4ForCausalLM) saved under the published names and dtypes
    (bf16 weights; float32 sinks, `ape`, router bias and `hc_*`; int32 `tid2eid`) with its config.json."""
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(**{**TINY_V4, **overrides})
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg)
    tensors = {}
    for name, t in model.state_dict().items():
        a = t.float().numpy() if t.is_floating_point() else t.numpy()
        if name.endswith(".experts.gate_up_proj") or name.endswith(".experts.down_proj"):
            prefix = published_name(name.rsplit(".", 1)[0])
            for e, m in enumerate(a):
                if name.endswith("gate_up_proj"):
                    half = m.shape[0] // 2
                    tensors[f"{prefix}.{e}.w1.weight"], tensors[f"{prefix}.{e}.w3.weight"] = m[:half], m[half:]
                else:
                    tensors[f"{prefix}.{e}.w2.weight"] = m
            continue
        tensors[published_name(name)] = a
    for name, a in tensors.items():
        if a.dtype.kind == "f":
            tensors[name] = a.astype(np.float32 if FLOAT32_PUBLISHED.search(name) else BF16)
        else:
            tensors[name] = a.astype(np.int32)
    dest = Path(dest)
    dest.mkdir(parents=True)
    save_file(dest / "model.safetensors", tensors)
    cfg.save_pretrained(dest)
    return dest

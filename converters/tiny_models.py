"""Small random models of a family's real architecture, built and saved with `transformers`.

They exercise exactly the tensor names, layouts and config keys of the real checkpoints with tiny
dimensions (random weights, so a wrong transform changes the logits). Used by tests, the demo and
`ckptflow make-test-model`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from converters.core import registry
from converters.families.deepseek import TRANSFORMERS_MODEL_TYPE

# Per family (`Family.test_models` in converters/families/): the real model whose config is shrunk, and the tiny
# dimensions; one entry per variant (Gemma3: text only and with its vision tower).
TINY = {name: spec for f in registry.FAMILIES.values() for name, spec in f.test_models.items()}
# tensors the models keep in float32 whatever the checkpoint dtype (DeepSeek routing bias, V3.2 indexer weights)
FP32_TENSORS = ("e_score_correction_bias", "indexer.weights_proj.weight")
# the `auto_map` of repos published under a model_type transformers does not know (never run: ckptflow reads weights)
REMOTE_CODE = {
    "kimi_k2": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    }
}
# gemma3-mm: 28px images of 7px patches (16 patches), pooled 2x2 into 4 soft tokens per image
TINY_VISION = {
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "image_size": 28,
    "patch_size": 7,
}
TINY_MM = {"mm_tokens_per_image": 4, "boi_token_index": 5, "eoi_token_index": 6}

# The test models the shared round-trip tests run on (tests/convert/test_engine.py, tests/io/test_orbax.py): plain
# dense families whose round trips are bit-exact except the tensors those tests' SCALED table names. Every other
# family has its own round-trip tests (tests/families/test_<family>.py), so a new family needs no entry here.
GENERIC_TEST_MODELS = ("llama3.1", "qwen2.5", "qwen3")


def tiny_config(family: str, *, layers: int = 2, vocab: int = 512, tied: bool | None = None) -> dict:
    if family not in TINY:
        raise registry.UnsupportedModelError(f"no test model for family {family!r}; choose one of {', '.join(TINY)}")
    base, dims = TINY[family]
    cfg = copy.deepcopy(registry.model(base)[1])
    if cfg.get("model_type") == "gemma4_text" and family.endswith("-mm"):  # the text model inside a tiny multimodal one
        from converters.families.gemma4_vision import tiny_multimodal

        return tiny_multimodal(tiny_config(family[: -len("-mm")], layers=layers, vocab=vocab, tied=tied))
    if cfg.get("model_type") in ("qwen3_vl", "qwen3_vl_moe"):  # the multimodal layout, with a tiny vision tower
        from converters.families.qwen3_vl import tiny_multimodal

        return tiny_multimodal(cfg, dims, layers=layers, vocab=vocab, tied=tied)
    if cfg.get("model_type") == "qwen3_5_moe":  # the published multimodal layout, with a tiny vision tower
        from converters.families.qwen3_5 import tiny_multimodal

        return tiny_multimodal(cfg, dims, layers=layers, vocab=vocab, tied=tied)
    if cfg.get("model_type") == "llama4":  # the text model, or (`-mm`) the published multimodal layout
        from converters.families.llama4 import tiny_config as llama4_tiny

        return llama4_tiny(family, cfg, dims, layers=layers, vocab=vocab, tied=tied)
    if "text_config" in cfg:  # Gemma3: shrink the text model; keep the vision tower only for the multimodal variant
        text = {**cfg["text_config"], "architectures": ["Gemma3ForCausalLM"], "tie_word_embeddings": True}
        text.update(dims, num_hidden_layers=layers, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
        if not family.endswith("-mm"):
            return text
        from converters.families.gemma import gemma3_mt_vocab

        text.pop("architectures")
        cfg.update(TINY_MM, text_config=text, image_token_index=gemma3_mt_vocab(vocab), eos_token_id=2)
        cfg["vision_config"].update(TINY_VISION)
        return cfg
    if cfg.get("model_type") == "gemma4_text":
        # transformers makes the last Gemma4 layer global, MaxText repeats its pattern (every 6th global; gemma4-e2b
        # every 5th): only multiples of the period agree. KV-shared layers need an unshared donor of each kind before
        # them: at least two periods
        period = cfg["layer_types"].index("full_attention") + 1
        layers = max(-(-layers // period), 2 if dims.get("num_kv_shared_layers") else 1) * period
    cfg.update(dims, num_hidden_layers=layers, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = layers
    if family == "qwen3-next":  # the published cycle: 3 gated-delta-net layers, then full attention
        cfg["layer_types"] = [
            "full_attention" if (i + 1) % cfg["full_attention_interval"] == 0 else "linear_attention"
            for i in range(layers)
        ]
    if "compress_ratios" in cfg:  # DeepSeek-V4: the published pattern and hash-routed prefix, cut to the tiny depth
        cfg["compress_ratios"] = dims.get("compress_ratios", cfg["compress_ratios"])[:layers]
        cfg["num_hash_layers"] = min(cfg["num_hash_layers"], layers)
    if "layer_types" in cfg:  # GPT-OSS: the published pattern, cut to the tiny depth
        cfg["layer_types"] = [cfg["layer_types"][i % len(cfg["layer_types"])] for i in range(layers)]
    if tied is not None:
        cfg["tie_word_embeddings"] = tied
    return cfg


def make_test_model(
    family: str,
    out: str | os.PathLike,
    *,
    layers: int = 2,
    vocab: int = 512,
    dtype: str = "bfloat16",
    seed: int = 0,
    tied: bool | None = None,
) -> Path:
    """Build a random `transformers` model of `family`, save it as safetensors in `out`, return `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_config(family, layers=layers, vocab=vocab, tied=tied)
    cfg.pop("architectures", None)
    published = model_type = cfg.pop("model_type")
    cfg.pop("torch_dtype", None)
    model_type = TRANSFORMERS_MODEL_TYPE.get(model_type, model_type)  # Kimi-K2: built as DeepSeek-V3
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM
    # no causal-LM class (Qwen3-VL), or one without the tower (Qwen3.5, Llama 4): the image-text-to-text one
    if type(config) not in auto._model_mapping or model_type in ("qwen3_5_moe", "llama4"):
        from transformers import AutoModelForImageTextToText as auto
    model = auto.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            # norms near 1, everything else large enough that any misplaced element moves the logits. Gemma's
            # RMSNorms scale by 1 + weight: their weights sit near 0, as in the real checkpoints
            # (Qwen3-Next's too, except the plain gated norm of its delta-net output)
            # (not Gemma4's: it folded the 1 into its weights)
            zero_centred = (model_type.startswith(("gemma2", "gemma3")) and "vision_tower" not in name) or (
                model_type in ("qwen3_next", "qwen3_5_moe") and "linear_attn.norm" not in name and "visual" not in name
            )
            norm_one = 0.0 if zero_centred else 1.0
            p.copy_(norm_one + 0.1 * noise if "norm" in name else 0.08 * noise)
            if name.endswith(("router.scale", "router.per_expert_scale")):  # Gemma4's router scales: ones at init
                p.copy_(1.0 + 0.3 * noise)
        # DeepSeek-V3's routing correction bias is a float32 buffer (not a parameter) and V3.2's indexer weights_proj a
        # float32 parameter, in the published repos too
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
            if n.endswith("layer_scalar"):  # Gemma4's per-layer output scale, a saved buffer
                b.copy_(1.0 + 0.1 * torch.randn(b.shape, generator=g))
            if n.endswith(("vision_tower.std_bias", "vision_tower.std_scale")):  # Gemma4's tower: uninitialised buffers
                b.copy_(float(n.endswith("scale")) + 0.1 * torch.randn(b.shape, generator=g))
            if n.endswith("tid2eid"):  # DeepSeek-V4's hash routing (zeros at init): top_k distinct experts per token
                experts = config.n_routed_experts
                b.copy_(torch.stack([torch.randperm(experts, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]))
        # DeepSeek-V4 keeps its norms, hyper-connections, sinks and position biases in float32 (in the published
        # repo too): transformers' own list of them
        strict = (
            tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) if model_type == "deepseek_v4" else ()
        )
        fp32 = {
            n: t.detach().clone()
            for n, t in [*model.named_parameters(), *model.named_buffers()]
            if n.endswith(FP32_TENSORS) or any(m in n.split(".") for m in strict)
        }
    model = model.to(getattr(torch, dtype))
    with torch.no_grad():
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            if n in fp32:
                t.data = fp32[n]
    out = Path(out)
    model.save_pretrained(out)
    if model_type == "gemma3":
        _published_vision_names(out)
    if model_type == "qwen3_vl_moe":
        _published_expert_layout(out)
    if model_type == "deepseek_v4":  # the names of deepseek-ai/DeepSeek-V4-* on disk (transformers reads both)
        from converters.families.deepseek4 import published_name

        rename_on_disk(out, published_name)
    if published != model_type:  # the published config: its own model_type, loaded through the repo's remote code
        import json

        saved = json.loads((out / "config.json").read_text())
        saved.update(model_type=published, auto_map=REMOTE_CODE.get(published, {}))
        (out / "config.json").write_text(json.dumps(saved, indent=2))
    return out


def _published_expert_layout(folder: Path) -> None:
    """Store Qwen3-VL-MoE's fused experts as the Qwen/Qwen3-VL-*-A*B repos do (`gate_up_proj` `[X, emb, 2F]`,
    `down_proj` `[X, F, emb]`); transformers >= 5 writes its in-memory transpose and reads both. The config then
    names the transformers version that wrote that layout, as the published one does (it decides how the
    converter reads the experts: converters/families/qwen3_vl.py)."""
    import json

    from safetensors.torch import load_file, save_file

    cfg = json.loads((folder / "config.json").read_text())
    cfg["transformers_version"] = "4.57.0.dev0"
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        fixed = {
            k: (
                v.transpose(1, 2).contiguous()
                if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
                else v
            )
            for k, v in tensors.items()
        }
        save_file(fixed, path, metadata={"format": "pt"})


def _published_vision_names(folder: Path) -> None:
    """Rename the vision tower as the google/gemma-3-*-it repos name it on disk (`vision_tower.vision_model.*`).

    transformers >= 5 writes `vision_tower.*` and reads both; converters must handle the published names.
    """
    prefix = "vision_tower."
    rename_on_disk(folder, lambda k: "vision_tower.vision_model." + k[len(prefix) :] if k.startswith(prefix) else k)


def rename_on_disk(folder: Path, rename) -> None:
    """Rename every tensor of a saved folder (its safetensors files and index) by `rename(name)`."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        save_file({rename(k): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        import json

        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")


def write_synthetic_checkpoint(out: str | os.PathLike, cfg: dict, *, shard_bytes: int = 5 << 30, seed: int = 0) -> Path:
    """Random bf16 weights for `cfg` written straight to safetensors (no torch; for large benchmark models).

    Values are random bits confined to |x| in [2^-7, 2^-5): no inf/nan, and as incompressible as real weights.
    """
    import ml_dtypes
    import numpy as np

    from converters.io.safetensors import PlannedTensor

    bf16 = np.dtype(ml_dtypes.bfloat16)
    tensors = [PlannedTensor(name, shape, bf16) for name, shape in hf_shapes(cfg).items()]
    return write_random_safetensors(out, tensors, cfg, shard_bytes=shard_bytes, seed=seed)


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model `cfg` and its shape, once (a split rule plans one leaf per part of a tensor)."""
    family = registry.family_for_config(cfg)
    return {name: leaf.hf_shape for leaf in family.plan(cfg, scan=False) for _, name in leaf.hf_names()}


def random_bf16(t, size: tuple[int, ...], rng):
    """Random bf16 bits with |x| in [2^-7, 2^-5) (no inf/nan; as incompressible as real weights)."""
    import ml_dtypes
    import numpy as np

    bits = rng.integers(0, 1 << 16, size=size, dtype=np.uint16)
    return ((bits & np.uint16(0x81FF)) | np.uint16(0x3C00)).view(ml_dtypes.bfloat16)


def write_random_safetensors(
    out: str | os.PathLike, tensors: list, cfg: dict, *, shard_bytes: int = 5 << 30, seed: int = 0, fill=random_bf16
) -> Path:
    """`tensors` (`PlannedTensor`s) as safetensors shards with an index and `cfg` as config.json, written in blocks of
    about 64 MB of rows made by `fill(tensor, block shape, rng)`."""
    import json

    import numpy as np

    from converters.io.safetensors import ShardWriter, plan_shards, shard_names, write_index

    shards = plan_shards(tensors, shard_bytes)
    names = shard_names(len(shards))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for shard, fname in zip(shards, names):
        w = ShardWriter(out / fname, shard)
        for t in shard:
            rows_per_block = max(1, (64 << 20) // max(1, t.nbytes // max(1, t.shape[0])))
            for start in range(0, t.shape[0], rows_per_block):
                w.write(t.name, fill(t, (min(rows_per_block, t.shape[0] - start),) + t.shape[1:], rng))
        w.close()
    write_index(out, shards, names)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out

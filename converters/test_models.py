"""Small random models of a family's real architecture, built and saved with `transformers`.

They exercise exactly the tensor names, layouts and config keys of the real checkpoints with tiny
dimensions (random weights, so a wrong transform changes the logits). Used by tests, the demo and
`ckptflow make-test-model`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from converters import registry

# Per family: the real model whose config is shrunk, and the tiny dimensions. head_dim is chosen so that
# heads * head_dim != hidden_size where the architecture allows it (catches projections sized from hidden).
TINY = {
    "llama3.1": ("llama3.1-8b", {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 96}),
    "qwen2.5": ("qwen2.5-7b", {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96}),
    "qwen3": ("qwen3-0.6b", {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 96}),
}


FAMILIES = tuple(TINY)


def tiny_config(family: str, *, layers: int = 2, vocab: int = 512, tied: bool | None = None) -> dict:
    if family not in TINY:
        raise registry.UnsupportedModelError(f"no test model for family {family!r}; choose one of {', '.join(TINY)}")
    base, dims = TINY[family]
    cfg = copy.deepcopy(registry.model(base)[1])
    cfg.update(dims, num_hidden_layers=layers, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = layers
    if tied is not None:
        cfg["tie_word_embeddings"] = tied
    return cfg


def make_test_model(family: str, out: str | os.PathLike, *, layers: int = 2, vocab: int = 512, dtype: str = "bfloat16", seed: int = 0, tied: bool | None = None) -> Path:
    """Build a random `transformers` model of `family`, save it as safetensors in `out`, return `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_config(family, layers=layers, vocab=vocab, tied=tied)
    cfg.pop("architectures", None)
    model_type = cfg.pop("model_type")
    cfg.pop("torch_dtype", None)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            # norms near 1, everything else large enough that any misplaced element moves the logits
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.08 * noise)
    model = model.to(getattr(torch, dtype))
    out = Path(out)
    model.save_pretrained(out)
    return out

"""Which families and MaxText model names ckptflow knows. Light to import (numpy only): DAGs parse it."""

from __future__ import annotations

import copy

from converters.core.direction import Direction
from converters.core.mapping import Family
from converters.errors import UnsupportedModelError
from converters.families.deepseek import DeepSeek2, DeepSeek3, DeepSeek32
from converters.families.deepseek4 import DeepseekV4
from converters.families.gemma import Gemma2, Gemma3
from converters.families.gemma4 import Gemma4
from converters.families.gemma4_small import Gemma4Small
from converters.families.gpt_oss import GptOss
from converters.families.llama import Llama31
from converters.families.llama4 import Llama4
from converters.families.mistral import Mistral
from converters.families.mixtral import Mixtral
from converters.families.olmo3 import Olmo3
from converters.families.qwen import Qwen3, Qwen25
from converters.families.qwen3_5 import Qwen3_5Moe
from converters.families.qwen3_moe import Qwen3Moe
from converters.families.qwen3_next import Qwen3Next
from converters.families.qwen3_vl import Qwen3VL, Qwen3VLMoe

FAMILIES: dict[str, type[Family]] = {
    f.name: f
    for f in (
        Llama31,
        Mistral,
        Qwen25,
        Qwen3,
        Gemma2,
        Gemma3,
        Qwen3Moe,
        Mixtral,
        GptOss,
        DeepSeek2,
        DeepSeek3,
        DeepSeek32,
        DeepseekV4,
        Qwen3Next,
        Qwen3_5Moe,
        Qwen3VL,
        Qwen3VLMoe,
        Olmo3,
        Gemma4,
        Gemma4Small,
        Llama4,
    )
}

# every family converts both ways, scanned and unscanned: "hf->maxtext (scanned)", ...
DIRECTIONS = tuple(d.label(scan) for d in Direction for scan in (True, False))


def model_names() -> list[str]:
    return [m for f in FAMILIES.values() for m in f.models]


def family(name: str) -> type[Family]:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(f"unknown family {name!r}; supported: {', '.join(FAMILIES)}") from None


def model(name: str) -> tuple[type[Family], dict]:
    """MaxText model name (e.g. `llama3.1-8b`) -> (family, its published HF config)."""
    base = name[: -len("-instruct")] if name.lower().endswith("-instruct") else name
    for f in FAMILIES.values():
        if base in f.models:
            return f, copy.deepcopy(f.models[base])
    raise UnsupportedModelError(f"unknown model {name!r}; supported: {', '.join(model_names())}")


def family_for_model_type(model_type: str, cfg: dict | None = None) -> type[Family]:
    """The family converting `model_type`; when several families share it, the first whose `Family.accepts(cfg)`
    (without `cfg`, or when none accepts: the first, whose `dims` then says why it cannot convert the config)."""
    candidates = [f for f in FAMILIES.values() if model_type in f.model_types]
    if candidates:
        return next((f for f in candidates if cfg is not None and f.accepts(cfg)), candidates[0])
    supported = ", ".join(f"{t} ({f.name})" for f in FAMILIES.values() for t in f.model_types)
    raise UnsupportedModelError(f"no family converts model_type {model_type!r} (supported: {supported})")


def family_for_config(cfg: dict) -> type[Family]:
    """The family of an HF config: its `model_type`, and its `architectures` must name a class the family
    converts (a `Qwen3ForSequenceClassification` has a qwen3 body but another head: not a language model)."""
    mt = cfg.get("model_type")
    archs = cfg.get("architectures")
    names = [str(a) for a in archs] if isinstance(archs, list) else []
    try:
        f = family_for_model_type(mt, cfg)
    except UnsupportedModelError:
        arch = ", ".join(names) or "?"
        supported = ", ".join(f"{t} ({f.name})" for f in FAMILIES.values() for t in f.model_types)
        raise UnsupportedModelError(
            f"unsupported architecture: model_type {mt!r} ({arch}); supported model types: {supported}"
        ) from None
    other = [a for a in names if a not in f.architectures]
    if other:
        raise UnsupportedModelError(
            f"config.json declares {', '.join(other)}: ckptflow converts {f.name} checkpoints of "
            f"{' or '.join(f.architectures)} "
            "(a language model); another head's weights would convert silently into a wrong model"
        )
    return f


def table() -> list[dict]:
    return [
        {
            "model": m,
            "family": f.name,
            # the published checkpoint's own (Kimi-K2: kimi_k2; Llama 4: the multimodal class)
            "hf_model_type": f.models[m].get("model_type") or f.model_types[0],
            "architecture": (f.models[m].get("architectures") or f.architectures)[0],
            "directions": [d.label(scan) for d in Direction for scan in (True, False) if f.scannable or not scan],
        }
        for f in FAMILIES.values()
        for m in f.models
    ]

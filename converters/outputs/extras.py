"""The files besides the weights an HF model folder needs (config, generation defaults, tokenizer, processor),
and copying them: beside a MaxText checkpoint on import, back into the HF folder on export."""

from __future__ import annotations

import shutil
from pathlib import Path

HF_EXTRA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)


def copy_hf_extras(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy config/tokenizer files that exist in `src` (never weights, never pickles)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in HF_EXTRA_FILES:
        if name in skip:
            continue
        p = src / name
        if p.is_file():
            shutil.copyfile(p, dst / name)
            copied.append(name)
    return copied

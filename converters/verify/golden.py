"""Golden logits files: HF logits saved once, compared against later (JSON lines, never pickle).

One JSON object per line, in MaxText's golden-logits format (`prompt`, `tokens`, `logits` as
`[positions][vocab]` floats) plus a few descriptive fields (`name`, `dtype`, `model_type`,
`vocab_size`). MaxText's own `.jsonl` golden files therefore load too. Floats are written with 9
significant digits, which round-trips float32 exactly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from converters.errors import CkptflowError, CorruptFileError
from converters.verify.prompts import Prompt


@dataclass
class GoldenRecord:
    prompt: Prompt
    logits: np.ndarray  # float32 [T, V]
    meta: dict


def _row(values: np.ndarray) -> str:
    return "[" + ",".join(f"{v:.9g}" for v in values.tolist()) + "]"


def write_golden(path: str | os.PathLike, records: list[tuple[Prompt, np.ndarray]], meta: dict) -> Path:
    """Write one line per prompt. Refuses non-finite logits (JSON has no NaN/inf)."""
    path = Path(path)
    if path.suffix in (".pkl", ".pickle"):
        raise CkptflowError("golden files are JSON lines; use a .jsonl name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for prompt, logits in records:
            logits = np.asarray(logits, dtype=np.float32)
            if logits.ndim != 2 or logits.shape[0] != prompt.length:
                raise ValueError(f"logits {logits.shape} do not match {prompt.length} tokens")
            if not np.all(np.isfinite(logits)):
                raise CkptflowError(f"the HF model produced non-finite logits for prompt {prompt.name!r}")
            head = {"name": prompt.name, "prompt": prompt.text, "tokens": prompt.token_ids, **meta}
            # Written by hand so a [T, V] array never becomes a Python list of lists at once.
            f.write(json.dumps(head)[:-1] + ', "logits": [')
            f.write(",".join(_row(r) for r in logits))
            f.write("]}\n")
    os.replace(tmp, path)
    return path


def read_golden(path: str | os.PathLike) -> list[GoldenRecord]:
    path = Path(path)
    if path.suffix in (".pkl", ".pickle"):
        raise CkptflowError(f"{path}: pickle golden files are not read (unsafe); convert it to .jsonl")
    if not path.is_file():
        raise CkptflowError(f"golden file not found: {path}")
    records: list[GoldenRecord] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorruptFileError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "tokens" not in obj or "logits" not in obj:
                raise CorruptFileError(f"{path}:{n}: expected an object with 'tokens' and 'logits'")
            tokens = [int(t) for t in obj["tokens"]]
            logits = np.asarray(obj["logits"], dtype=np.float32)
            if logits.ndim == 3 and logits.shape[0] == 1:  # [1, T, V] as some generators write
                logits = logits[0]
            if logits.ndim != 2 or logits.shape[0] != len(tokens):
                raise CorruptFileError(
                    f"{path}:{n}: logits shape {logits.shape} does not match {len(tokens)} tokens"
                )
            name = obj.get("name") or f"golden-{len(records)}"
            meta = {k: v for k, v in obj.items() if k not in ("tokens", "logits", "prompt", "name")}
            records.append(GoldenRecord(Prompt(name=name, token_ids=tokens, text=obj.get("prompt")), logits, meta))
    if not records:
        raise CorruptFileError(f"{path}: no records")
    return records


def estimated_size_bytes(prompts: list[Prompt], vocab: int) -> int:
    """~13 bytes per logit; the default prompts on a 150k vocabulary make a ~1 GB file."""
    return int(sum(p.length for p in prompts) * vocab * 13 + 1024 * len(prompts))


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    e = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**e:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][e]}"

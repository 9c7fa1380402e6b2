"""Prompts fed to both sides of a verification run.

The defaults are three short prompts and one long (~500 token) prompt. Short prompts alone cannot
catch position-dependent bugs: the rotary embedding at position 0 is the identity and rotates only
the fastest dimension pairs noticeably over the next few positions, so a checkpoint with a wrong
RoPE layout still produces near-identical logits on a 4-token prompt. The long prompt is there to
exercise every rotary frequency over hundreds of relative distances.

With a tokenizer the prompt texts are tokenized with the tokenizer's default special tokens (BOS
where the tokenizer adds one). Without a tokenizer (the tiny test models) each default prompt is
replaced by a fixed, seeded sequence of token ids of a fixed length, so runs are reproducible.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from converters.errors import CkptflowError

SHORT_PROMPTS: tuple[str, ...] = ("I love to", "Today is a", "What is the")

# An original passage (not taken from any other project). It is repeated so that, on a trained
# model, the later copies are predictable from the earlier ones: logits become confident and any
# error in how far-apart positions attend to each other shows up as a large KL.
_LONG_PASSAGE = (
    "On the northern coast of Brittany the tide can rise by more than twelve metres in six hours. "
    "Fishermen in the small harbour of Paimpol learned to read the water long before tide tables "
    "were printed: they watched the seaweed on the granite steps, the colour of the sand bars and "
    "the flight of the gulls over the estuary. A boat that left too late would sit on the mud "
    "until evening. "
)
_LONG_QUESTION = (
    "\n\nAccording to the passage above, before printed tide tables existed the fishermen of "
    "Paimpol decided when to sail by"
)
LONG_PROMPT_REPEATS = 5

# Token counts used for seeded id sequences when no tokenizer is available. They match what a
# typical BPE tokenizer produces for the default prompts (3 words + BOS; ~500 for the long one).
SHORT_PROMPT_LENGTH = 4
LONG_PROMPT_LENGTH = 500


def build_long_prompt(repeats: int = LONG_PROMPT_REPEATS) -> str:
    """The default long prompt: the passage repeated `repeats` times, then a question about it."""
    return _LONG_PASSAGE * repeats + _LONG_QUESTION


def default_prompt_texts() -> list[str]:
    return [*SHORT_PROMPTS, build_long_prompt()]


@dataclass
class Prompt:
    """One prompt: a display label, its text (None for synthetic ids) and the token ids fed to both sides."""

    name: str
    token_ids: list[int]
    text: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    def label(self, width: int = 48) -> str:
        if self.text is None:
            return f"{self.name} ({self.length} seeded ids)"
        t = self.text.replace("\n", " ").strip()
        return t if len(t) <= width else t[: width - 3] + "..."


def seeded_token_ids(length: int, vocab_size: int, seed: int) -> list[int]:
    """A reproducible id sequence in [0, vocab_size) (numpy PCG64, independent of platform)."""
    if vocab_size <= 0:
        raise CkptflowError(f"cannot draw token ids from an empty vocabulary (vocab_size={vocab_size})")
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(0, vocab_size, size=length)]


def synthetic_default_prompts(vocab_size: int, seed: int = 0) -> list[Prompt]:
    """The tokenizer-less defaults: three short and one long seeded id sequence."""
    lengths = [SHORT_PROMPT_LENGTH] * len(SHORT_PROMPTS) + [LONG_PROMPT_LENGTH]
    names = [f"short-{i}" for i in range(len(SHORT_PROMPTS))] + ["long"]
    return [
        Prompt(name=n, token_ids=seeded_token_ids(L, vocab_size, seed + i), meta={"seed": seed + i})
        for i, (n, L) in enumerate(zip(names, lengths))
    ]


def tokenize(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    if ids and isinstance(ids[0], list):  # batched output from some tokenizers
        ids = ids[0]
    return [int(i) for i in ids]


def read_prompts_file(path: str | os.PathLike) -> list[dict]:
    """Read user prompts.

    `*.jsonl` / `*.json`: one JSON object per line with `prompt` (text) and/or `tokens` (ids).
    Anything else: plain text, one prompt per non-empty line (`\\n` escapes are expanded).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CkptflowError(f"prompts file not found: {path}")
    entries: list[dict] = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if path.endswith((".jsonl", ".json")):
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CkptflowError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or ("prompt" not in obj and "tokens" not in obj):
                raise CkptflowError(f"{path}:{n}: expected an object with 'prompt' and/or 'tokens'")
            entries.append({"prompt": obj.get("prompt"), "tokens": obj.get("tokens")})
    else:
        for line in lines:
            if line.strip():
                entries.append({"prompt": line.replace("\\n", "\n"), "tokens": None})
    if not entries:
        raise CkptflowError(f"prompts file {path} contains no prompts")
    return entries


def build_prompts(
    *,
    tokenizer=None,
    vocab_size: int,
    prompts_file: str | os.PathLike | None = None,
    seed: int = 0,
) -> list[Prompt]:
    """The prompts for one run: from `prompts_file` if given, else the defaults.

    Ids outside [0, vocab_size) are rejected: both models would index out of range.
    """
    prompts: list[Prompt] = []
    if prompts_file:
        for i, e in enumerate(read_prompts_file(prompts_file)):
            if e["tokens"] is not None:
                ids = [int(t) for t in e["tokens"]]
            elif tokenizer is not None:
                ids = tokenize(tokenizer, e["prompt"])
            else:
                raise CkptflowError(
                    f"prompt {i + 1} in {prompts_file} is text but no tokenizer was found; "
                    "give token ids ('tokens' in a .jsonl file) or provide tokenizer files"
                )
            prompts.append(Prompt(name=f"prompt-{i}", token_ids=ids, text=e["prompt"]))
    elif tokenizer is not None:
        names = [f"short-{i}" for i in range(len(SHORT_PROMPTS))] + ["long"]
        for name, text in zip(names, default_prompt_texts()):
            prompts.append(Prompt(name=name, token_ids=tokenize(tokenizer, text), text=text))
    else:
        prompts = synthetic_default_prompts(vocab_size, seed)

    for p in prompts:
        if not p.token_ids:
            raise CkptflowError(f"prompt {p.name!r} has no tokens")
        bad = [t for t in p.token_ids if not 0 <= t < vocab_size]
        if bad:
            raise CkptflowError(
                f"prompt {p.name!r} has token id {bad[0]} outside the vocabulary [0, {vocab_size})"
            )
    return prompts

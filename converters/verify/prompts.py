"""Prompts fed to both sides of a verification run.

The defaults are three short prompts and one long (~500 token) prompt.

Why a long prompt: RoPE at position 0 is the identity and over the next few positions only the
fastest dimension pairs rotate noticeably, so a checkpoint with a wrong RoPE layout (or another
position-dependent mistake: RoPE scaling, sliding windows, masks) still gives near-identical logits
on a 4-token prompt. A long prompt exercises every rotary frequency over hundreds of distances.

Why not a repeated passage: a trained model copies what it has already seen, so after the first copy
its predictions are near-certain whatever the attention does and the KL flattens for the rest of the
prompt. The long prompt is one stretch of original, non-repeating text mixing genres, languages,
scripts and code, which exercise different parts of the vocabulary and of attention (local syntax,
long-range references, indentation). It ends with a question about its first paragraph and the start
of the answer, so the last next-token distribution is confident and needs attention ~500 tokens back.

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

# The long prompt's sections, joined by blank lines. Original text written for this project; every
# sentence occurs once (tests/verify/test_prompts.py checks this). ~1950 characters: ~515 tokens
# with the Llama 3 and Qwen tokenizers.
_LONG_SECTIONS: tuple[str, ...] = (
    # English narrative: the question at the end refers back to it.
    "The night ferry to Stromness was forty minutes late when Maren found a seat by the window. "
    "Rain streaked the glass, and below deck a radio played an old fiddle tune. She unfolded the "
    "letter from her grandmother once more and tried to picture a woman she had met only twice.",
    # Technical / scientific explanation.
    "A lithium-ion cell stores energy by moving lithium ions between two electrodes. While it "
    "charges, ions leave the cathode, cross the electrolyte and settle between the graphite layers "
    "of the anode. Capacity fades because a thin film, the solid electrolyte interphase, keeps "
    "growing on the anode and traps a little lithium in every cycle.",
    # French, German, Spanish: unrelated topics, not translations of each other.
    "Le marché de la Croix-Rousse ouvre dès six heures le samedi. Un fromager y découpe du comté "
    "pour les premiers clients, et à midi il ne reste presque plus de pain aux noix.",
    "Im Herbst wandern viele Familien über die Höhenwege des Schwarzwalds. Wer früh aufbricht, "
    "sieht den Nebel in den Tälern liegen und erreicht die Hütte, bevor die Küche öffnet.",
    "En el desierto de Atacama el cielo está despejado casi todo el año, por eso los astrónomos "
    "construyeron allí telescopios enormes. ¿Quién no querría ver la Vía Láctea desde allí?",
    # Non-Latin scripts: Chinese, Japanese, Russian.
    "秋天的杭州很美，西湖边的桂花开了。\n"
    "駅前の小さな本屋は、毎朝八時に店を開けます。\n"
    "Зимой в Новосибирске мороз иногда бывает сильнее тридцати градусов.",
    # Code: indentation, identifiers, operators, a docstring and a comment.
    "def moving_average(values, window=3):\n"
    '    """Return the mean of every run of `window` consecutive values."""\n'
    "    # Keep a running sum instead of re-adding the whole window each step.\n"
    "    total = sum(values[:window])\n"
    "    out = [total / window]\n"
    "    for i in range(window, len(values)):\n"
    "        total += values[i] - values[i - window]\n"
    "        out.append(total / window)\n"
    "    return out",
    # Dialogue with numbers, prices and dates.
    "Customer: Do you still have the green bicycle from the window?\n"
    "Clerk: We sold it on Tuesday, but a similar one arrives on 9 May.\n"
    "Customer: How much is it?\n"
    "Clerk: 349 euros, lock included.",
    # Question about the first section, then the start of the answer.
    "Question: In the story at the beginning, what did Maren read again on the ferry?\n"
    "Answer: She read the letter from her",
)
_LONG_PROMPT = "\n\n".join(_LONG_SECTIONS)

# Token counts used for seeded id sequences when no tokenizer is available. They match what a
# typical BPE tokenizer produces for the default prompts (3 words + BOS; ~500 for the long one).
SHORT_PROMPT_LENGTH = 4
LONG_PROMPT_LENGTH = 500


def build_long_prompt() -> str:
    """The default long prompt: varied, non-repeating text ending with a question and an answer cue."""
    return _LONG_PROMPT


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
            raise CkptflowError(f"prompt {p.name!r} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
    return prompts

"""Default prompts, seeded ids and the prompts-file formats."""

from __future__ import annotations

import re
import unicodedata
import zlib

import pytest

from converters.errors import CkptflowError
from converters.verify.prompts import (
    LONG_PROMPT_LENGTH,
    SHORT_PROMPTS,
    build_long_prompt,
    build_prompts,
    default_prompt_texts,
    seeded_token_ids,
    synthetic_default_prompts,
)


class WordTokenizer:
    """Stands in for an HF tokenizer: BOS + one id per whitespace-separated word."""

    def __call__(self, text):
        return {"input_ids": [1] + [3 + (sum(map(ord, w)) % 500) for w in text.split()]}


def test_defaults_are_three_short_and_one_long():
    texts = default_prompt_texts()
    assert texts[:3] == list(SHORT_PROMPTS)
    long = build_long_prompt()
    assert texts[3] == long
    # ~500 tokens with Llama 3 / Qwen BPE tokenizers (measured: 1940 characters -> 514 tokens)
    assert 1700 <= len(long) <= 2600
    assert 250 <= len(long.split()) <= 400


def test_long_prompt_does_not_repeat():
    """A trained model copies repeated text, which flattens the KL after the first copy."""
    long = build_long_prompt()
    lines = [ln.strip() for ln in long.splitlines() if len(ln.strip()) >= 20]
    assert len(lines) == len(set(lines)), "a line occurs twice"
    sentences = [s.strip() for s in re.split(r"[.!?\n。！？]", long) if len(s.strip()) >= 20]
    assert len(sentences) >= 15
    assert len(sentences) == len(set(sentences)), "a sentence occurs twice"
    words = long.split()
    grams = [tuple(words[i : i + 12]) for i in range(len(words) - 11)]
    assert len(grams) == len(set(grams)), "a 12-word sequence occurs twice"
    # Repetition anywhere (not only on word boundaries) makes the text compress far better:
    # the old five-fold passage compressed to ~0.15 of its size; varied text stays above ~0.5.
    raw = long.encode("utf-8")
    assert len(zlib.compress(raw, 9)) > 0.45 * len(raw)


def _scripts(text: str) -> set[str]:
    """First word of the Unicode name of each letter: LATIN, CJK, HIRAGANA, KATAKANA, CYRILLIC..."""
    return {unicodedata.name(c, "?").split()[0] for c in text if c.isalpha()}


def test_long_prompt_mixes_genres_languages_and_code():
    long = build_long_prompt()
    scripts = _scripts(long)
    assert {"LATIN", "CJK", "CYRILLIC"} <= scripts
    assert scripts & {"HIRAGANA", "KATAKANA"}
    accented = {c for c in long if "WITH" in unicodedata.name(c, "") and "LATIN" in unicodedata.name(c, "")}
    assert len(accented) >= 6, accented  # French/German/Spanish diacritics
    words = set(re.findall(r"\w+", long.lower()))
    for lang, markers in {
        "English": {"the", "and", "was", "of"},
        "French": {"le", "les", "du", "et", "pour", "il"},
        "German": {"die", "den", "und", "über", "wer"},
        "Spanish": {"el", "los", "por", "está", "año"},
    }.items():
        assert len(words & markers) >= 3, lang
    # code: a function with a docstring, a comment and an indented block
    lines = long.splitlines()
    assert any(ln.startswith("def ") and ln.endswith(":") for ln in lines)
    assert '"""' in long
    assert any(ln.lstrip().startswith("# ") for ln in lines)
    assert any(ln.startswith("        ") for ln in lines)
    assert re.search(r"\d", long)  # numbers / dates


def test_long_prompt_ends_with_question_about_its_start():
    long = build_long_prompt()
    assert long == long.rstrip()  # a trailing space would be a token of its own
    *body, question, answer = long.splitlines()
    assert question.startswith("Question:") and question.endswith("?")
    assert answer.startswith("Answer:") and len(answer) > len("Answer:")
    # The question is about the first paragraph, so answering it needs attention ~500 tokens back:
    # its names occur there and nowhere in between.
    first, *middle = "\n".join(body).split("\n\n")
    names = re.findall(r"\b[A-Z][a-z]+\b", question.split(":", 1)[1].split(None, 1)[1])  # past its first word
    assert names
    for name in names:
        assert name in first and not any(name in part for part in middle), name


def test_seeded_ids_are_fixed_and_in_range():
    a = synthetic_default_prompts(512, seed=0)
    b = synthetic_default_prompts(512, seed=0)
    assert [p.token_ids for p in a] == [p.token_ids for p in b]
    assert [p.length for p in a] == [4, 4, 4, LONG_PROMPT_LENGTH]
    assert [p.name for p in a] == ["short-0", "short-1", "short-2", "long"]
    assert all(0 <= t < 512 for p in a for t in p.token_ids)
    assert len({tuple(p.token_ids) for p in a}) == 4
    assert synthetic_default_prompts(512, seed=1)[0].token_ids != a[0].token_ids
    # Pinned: numpy's PCG64 stream is stable, so runs stay comparable across machines and versions.
    assert seeded_token_ids(4, 512, 0) == [435, 326, 261, 138]
    assert a[0].token_ids == [435, 326, 261, 138]


def test_tokenizer_prompts():
    prompts = build_prompts(tokenizer=WordTokenizer(), vocab_size=512)
    assert [p.text for p in prompts] == default_prompt_texts()
    assert prompts[0].token_ids[0] == 1 and prompts[0].length == 4
    assert prompts[3].length > 250


def test_prompts_file_formats(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n second\\nline \n")
    ps = build_prompts(tokenizer=WordTokenizer(), vocab_size=512, prompts_file=txt)
    assert [p.text for p in ps] == ["first prompt", " second\nline "]

    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a b c"}\n{"tokens": [5, 6]}\n{"prompt": "x", "tokens": [9]}\n')
    ps = build_prompts(tokenizer=WordTokenizer(), vocab_size=512, prompts_file=jl)
    assert ps[0].length == 4 and ps[1].token_ids == [5, 6] and ps[2].token_ids == [9]
    # ids work without a tokenizer; text does not
    with pytest.raises(CkptflowError, match="no tokenizer"):
        build_prompts(tokenizer=None, vocab_size=512, prompts_file=jl)


@pytest.mark.parametrize(
    "content,match",
    [
        ("not json\n", "not valid JSON"),
        ('{"other": 1}\n', "'prompt' and/or 'tokens'"),
        ("\n\n", "no prompts"),
        ('{"tokens": []}\n', "no tokens"),
        ('{"tokens": [512]}\n', "outside the vocabulary"),
        ('{"tokens": [-1]}\n', "outside the vocabulary"),
    ],
)
def test_bad_prompts_files(tmp_path, content, match):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(CkptflowError, match=match):
        build_prompts(tokenizer=None, vocab_size=512, prompts_file=f)


def test_missing_prompts_file(tmp_path):
    with pytest.raises(CkptflowError, match="not found"):
        build_prompts(tokenizer=None, vocab_size=512, prompts_file=tmp_path / "nope.txt")

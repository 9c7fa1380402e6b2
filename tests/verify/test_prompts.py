"""Default prompts, seeded ids and the prompts-file formats."""

from __future__ import annotations

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
    assert 330 <= len(long.split()) <= 420  # ~500 BPE tokens (~1.3 tokens per English word)
    assert long.endswith("by")


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
    assert prompts[3].length > 300


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

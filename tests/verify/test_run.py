"""End to end: convert tiny models with the real converter, then verify against the HF model."""

from __future__ import annotations

import shutil

import pytest

from converters.errors import CkptflowError
from converters.verify import DEFAULT_MAX_KL, verify

FAMILIES = ("llama3.1", "qwen2.5", "qwen3")

# Precision in float32: the source model against MaxText on the checkpoint differs only in accumulation order
# (PyTorch vs XLA) and, for Llama, in the bf16 rounding of the query kernel after the 1/sqrt(D) scaling is
# baked in (the format part). Measured max per-token KL on these models: <= 3e-7 (Llama), <= 3e-13 (Qwen).
# 1e-5 leaves ample room for that noise while any real mapping error is >= 1e-3 (see below).
FLOAT32_MAX_KL = 1e-5


def _by_name(result) -> dict:
    return {p["name"]: p for p in result.data["prompts"]}


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unscanned"])
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_checkpoint_matches_hf(converted, family, scan):
    hf, ckpt = converted(family, scan)

    r32 = verify(maxtext=ckpt, hf=hf, dtype="float32", max_kl=FLOAT32_MAX_KL)
    assert r32.passed, r32.data["summary"]
    assert r32.data["maxtext"]["layout"] == ("scanned" if scan else "unscanned")
    assert r32.data["summary"]["kl_max"] < FLOAT32_MAX_KL
    assert [p["num_tokens"] for p in r32.data["prompts"]] == [4, 4, 4, 500]
    assert all(p["top10_overlap"] == 10 for p in r32.data["prompts"])
    v = r32.data["verdict"]
    assert v["content"]["passed"] and v["layout"]["passed"] and v["layout"]["kl_max"] < 1e-9  # accumulation order only
    if family != "llama3.1":  # nothing the format rounds: the checkpoint holds the source's values bit for bit
        assert v["content"]["bit_exact"] == v["content"]["tensors"]
        assert r32.data["comparisons"]["format"]["summary"]["kl_max"] == 0.0

    # bf16 weights and activations on both sides: rounding noise, well under MaxText's threshold.
    r16 = verify(maxtext=ckpt, hf=hf, dtype="bfloat16")
    assert r16.passed, r16.data["summary"]
    assert r16.data["summary"]["kl_max"] < DEFAULT_MAX_KL
    assert r16.data["summary"]["kl_max"] > r32.data["summary"]["kl_max"]  # bf16 really ran


# (family, damage (tests/verify/conftest.py DAMAGES), scanned layout?, do the short prompts pass?).
# Each damage is a classic conversion bug, applied to the converted Orbax arrays. Measured max KL on
# the long prompt: 0.06-0.6 against the 0.015 threshold. None: the short-prompt outcome is not pinned
# (those KLs sit near the threshold on these random models).
BREAKAGES = [
    ("llama3.1", "skip_rope_permutation", True, True),
    ("llama3.1", "skip_query_scaling", True, False),
    ("llama3.1", "swap_layers", False, False),
    ("qwen2.5", "transpose_square_query_kernel", True, False),
    ("qwen2.5", "swap_layers", True, False),
    ("qwen3", "wrong_rope_permutation", True, None),
    ("qwen3", "swap_gate_and_up", False, None),
]


@pytest.mark.parametrize(
    "family,damage,scan,short_passes",
    BREAKAGES,
    ids=[f"{f}-{d}-{'scan' if s else 'noscan'}" for f, d, s, _ in BREAKAGES],
)
def test_broken_conversion_fails_on_the_long_prompt(damaged, family, damage, scan, short_passes):
    hf, broken = damaged(family, damage, scan)
    r = verify(maxtext=broken, hf=hf, dtype="float32")  # default threshold 0.015
    assert not r.passed
    prompts = _by_name(r)
    assert not prompts["long"]["passed"], prompts["long"]["kl_max"]
    assert r.data["summary"]["kl_max"] > DEFAULT_MAX_KL
    if short_passes is not None:
        short_ok = all(prompts[f"short-{i}"]["passed"] for i in range(3))
        assert short_ok == short_passes, {n: p["kl_max"] for n, p in prompts.items()}


def test_long_prompt_is_what_catches_a_rope_layout_bug(damaged):
    """Skipping Llama's RoPE permutation leaves rotation at position 0 exact and the next few positions
    nearly so: all three short prompts pass, only the ~500-token prompt exposes the bug."""
    hf, broken = damaged("llama3.1", "skip_rope_permutation", True)
    r = verify(maxtext=broken, hf=hf, dtype="float32")
    p = _by_name(r)
    assert [p[f"short-{i}"]["passed"] for i in range(3)] == [True, True, True]
    assert max(p[f"short-{i}"]["kl_max"] for i in range(3)) < DEFAULT_MAX_KL / 2
    assert p["long"]["kl_max"] > 3 * DEFAULT_MAX_KL
    # The damage grows with distance: the first positions of the long prompt look fine too.
    assert max(p["long"]["kl_per_token"][:4]) < DEFAULT_MAX_KL
    assert r.data["summary"]["kl_max_prompt"] == "long"
    assert not r.passed


def test_wrong_hf_model_is_a_clear_error(converted):
    _, qwen3 = converted("qwen3")
    llama_hf, _ = converted("llama3.1")
    with pytest.raises(CkptflowError, match="missing"):
        verify(maxtext=qwen3, hf=llama_hf)


def test_reference_arguments_are_checked(converted, tmp_path):
    hf, ckpt = converted("qwen3")
    with pytest.raises(CkptflowError, match="exactly one reference"):
        verify(maxtext=ckpt)
    with pytest.raises(CkptflowError, match="exactly one reference"):
        verify(maxtext=ckpt, hf=hf, golden=tmp_path / "g.jsonl")
    with pytest.raises(CkptflowError, match="dtype"):
        verify(maxtext=ckpt, hf=hf, dtype="float16")
    with pytest.raises(CkptflowError, match="max-kl"):
        verify(maxtext=ckpt, hf=hf, max_kl=0)
    with pytest.raises(CkptflowError):
        verify(maxtext=tmp_path / "nope", hf=hf)


def test_items_dir_and_custom_prompts(converted, tmp_path):
    hf, ckpt = converted("qwen2.5", False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"tokens": [1, 5, 9, 300, 7, 7, 7]}\n{"tokens": [3]}\n')
    r = verify(maxtext=ckpt / "0" / "items", hf=hf, prompts_file=prompts, max_kl=FLOAT32_MAX_KL)
    assert r.passed
    assert [p["token_ids"] for p in r.data["prompts"]] == [[1, 5, 9, 300, 7, 7, 7], [3]]

    text = tmp_path / "p.txt"
    text.write_text("hello world\n")
    with pytest.raises(CkptflowError, match="no tokenizer"):
        verify(maxtext=ckpt, hf=hf, prompts_file=text)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": [1, 99999]}\n')
    with pytest.raises(CkptflowError, match="outside the vocabulary"):
        verify(maxtext=ckpt, hf=hf, prompts_file=bad)


def test_sidecar_config_mismatch_is_reported(converted, tmp_path):
    hf, ckpt = converted("qwen3")
    import json

    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    side = copy / "ckptflow" / "hf" / "config.json"
    cfg = json.loads(side.read_text())
    cfg["rms_norm_eps"] = 1e-3
    side.write_text(json.dumps(cfg))
    r = verify(maxtext=copy, hf=hf, max_kl=FLOAT32_MAX_KL)
    assert r.passed  # the HF folder's config drives the reference in --hf mode
    assert any("rms_norm_eps" in w for w in r.data["warnings"])

"""Golden mode end to end: `make_golden` streams the HF model like verify does, `verify --golden` compares with it.

The file format itself (round trips, MaxText's files, corrupt input, memory) is tested in test_golden_io.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from converters.errors import CkptflowError
from converters.verify import make_golden, verify
from converters.verify.golden import GoldenFile

FLOAT32_MAX_KL = 1e-5  # the format's bf16 rounding of Llama's scaled query: <= 3e-7 on these models


def test_golden_mode_round_trip(converted, damaged, tmp_path):
    hf, ckpt = converted("llama3.1", True)
    golden = make_golden(hf=hf, out=tmp_path / "llama.golden.jsonl")
    with GoldenFile(golden) as g:
        assert [r.prompt.length for r in g.records] == [4, 4, 4, 500]
        assert g.records[0].vocab_size == 512 and g.records[0].meta["dtype"] == "float32"

    # No HF folder needed: the architecture comes from the checkpoint's ckptflow/hf sidecar.
    good = verify(maxtext=ckpt, golden=golden, max_kl=FLOAT32_MAX_KL)
    assert good.passed, good.data["summary"]
    assert good.data["reference"]["kind"] == "golden"
    assert not good.data["verdict"]["content"]["ran"] and not good.data["verdict"]["layout"]["ran"]
    # the golden logits are the HF side's float32 logits, written exactly: the same precision numbers as with --hf
    direct = verify(maxtext=ckpt, hf=hf, max_kl=FLOAT32_MAX_KL)
    np.testing.assert_allclose(
        [p["kl_max"] for p in good.data["prompts"]], [p["kl_max"] for p in direct.data["prompts"]], rtol=1e-9
    )

    _, broken = damaged("llama3.1", "skip_rope_permutation", True)
    bad = verify(maxtext=broken, golden=golden)
    assert not bad.passed and not bad.data["verdict"]["precision"]["passed"]
    assert not {p["name"]: p for p in bad.data["prompts"]}["long"]["passed"]


def test_golden_logits_are_a_whole_model_forward(converted, tmp_path):
    """The streamed HF side, written out, equals transformers' whole-model forward bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM

    hf, _ = converted("qwen3", True)
    golden = make_golden(hf=hf, out=tmp_path / "q.jsonl", prompts_file=_ids_file(tmp_path), dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16, attn_implementation="eager").eval()
    with GoldenFile(golden) as g, torch.no_grad():
        (rec,) = g.records
        want = model(torch.tensor([rec.prompt.token_ids])).logits[0].float().numpy()
        np.testing.assert_array_equal(rec.logits_block(0, rec.vocab_size), want)


def test_golden_mode_needs_a_config(converted, tmp_path):
    hf, ckpt = converted("qwen3", True)
    golden = make_golden(hf=hf, out=tmp_path / "q.jsonl", prompts_file=_ids_file(tmp_path))
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    shutil.rmtree(bare / "ckptflow")
    with pytest.raises(CkptflowError, match="--hf-config"):
        verify(maxtext=bare, golden=golden)
    r = verify(maxtext=bare, golden=golden, hf_config=hf / "config.json", max_kl=FLOAT32_MAX_KL)
    assert r.passed
    with pytest.raises(CkptflowError, match="--prompts cannot be combined"):
        verify(maxtext=bare, golden=golden, hf_config=hf, prompts_file=_ids_file(tmp_path))


def _ids_file(tmp_path):
    f = tmp_path / "ids.jsonl"
    f.write_text('{"tokens": [1, 2, 3, 4, 5, 6]}\n')
    return f

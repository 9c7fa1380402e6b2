"""Golden files: format round trip, and verify --golden against good and broken checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from converters.errors import CkptflowError
from converters.verify import make_golden, verify
from converters.verify.golden import read_golden, write_golden
from converters.verify.prompts import Prompt

FLOAT32_MAX_KL = 1e-5  # same reasoning as test_run.py: float32 accumulation-order noise only


def test_round_trip_is_exact_float32(tmp_path):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 17)) * 10.0 ** rng.integers(-30, 30, size=(3, 17))).astype(np.float32)
    logits[0, :3] = [np.finfo(np.float32).max, np.finfo(np.float32).tiny, -0.0]
    p = Prompt(name="x", token_ids=[1, 2, 3], text='quote " and \n newline')
    path = write_golden(tmp_path / "g.jsonl", [(p, logits)], {"dtype": "float32", "model_type": "llama"})
    (rec,) = read_golden(path)
    assert rec.prompt.text == p.text and rec.prompt.token_ids == [1, 2, 3] and rec.prompt.name == "x"
    assert rec.logits.dtype == np.float32
    np.testing.assert_array_equal(rec.logits, logits)
    assert rec.meta["model_type"] == "llama"
    # plain JSON lines with MaxText's keys
    obj = json.loads(path.read_text().splitlines()[0])
    assert {"prompt", "tokens", "logits"} <= set(obj)


def test_maxtext_style_file_is_read(tmp_path):
    f = tmp_path / "golden_data_x.jsonl"
    f.write_text(json.dumps({"prompt": "I love to", "tokens": [1, 2], "logits": [[[0.5, 1.0], [2.0, 3.0]]]}) + "\n")
    (rec,) = read_golden(f)
    assert rec.logits.shape == (2, 2) and rec.prompt.name == "golden-0"


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("g.pkl", "", "pickle"),
        ("g.jsonl", "{oops\n", "not valid JSON"),
        ("g.jsonl", '{"tokens": [1]}\n', "'tokens' and 'logits'"),
        ("g.jsonl", '{"tokens": [1, 2], "logits": [[1.0]]}\n', "does not match"),
        ("g.jsonl", "\n", "no records"),
    ],
)
def test_bad_golden_files(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(CkptflowError, match=match):
        read_golden(f)


def test_non_finite_logits_are_refused(tmp_path):
    with pytest.raises(CkptflowError, match="non-finite"):
        write_golden(tmp_path / "g.jsonl", [(Prompt("x", [1]), np.array([[np.nan]], np.float32))], {})


def test_golden_mode_round_trip(converted, damaged, tmp_path):
    hf, ckpt = converted("llama3.1", True)
    golden = make_golden(hf=hf, out=tmp_path / "llama.golden.jsonl")
    records = read_golden(golden)
    assert [r.prompt.length for r in records] == [4, 4, 4, 500]

    # No HF folder needed: the architecture comes from the checkpoint's ckptflow/hf sidecar.
    good = verify(maxtext=ckpt, golden=golden, max_kl=FLOAT32_MAX_KL)
    assert good.passed, good.data["summary"]
    assert good.data["reference"]["kind"] == "golden"
    direct = verify(maxtext=ckpt, hf=hf, max_kl=FLOAT32_MAX_KL)
    assert good.data["summary"]["kl_max"] == pytest.approx(direct.data["summary"]["kl_max"], rel=1e-3, abs=1e-12)

    _, broken = damaged("llama3.1", "skip_rope_permutation", True)
    bad = verify(maxtext=broken, golden=golden)
    assert not bad.passed
    assert not {p["name"]: p for p in bad.data["prompts"]}["long"]["passed"]


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

"""--report DIR: verify.json with every metric, verify.md tables, and a real PNG plot."""

from __future__ import annotations

import json

import numpy as np

from converters.verify import verify
from converters.verify.report import render_markdown

PROMPT_FIELDS = {
    "name",
    "label",
    "text",
    "token_ids",
    "num_tokens",
    "kl_per_token",
    "kl_mean",
    "kl_max",
    "kl_argmax",
    "max_abs_logit_diff",
    "top1_agreement",
    "top10_overlap",
    "top10_jaccard",
    "top10_rank_agreement",
    "top10_ref",
    "top10_maxtext",
    "passed",
    "comparisons",
}
SUMMARY_FIELDS = {
    "num_prompts",
    "num_tokens",
    "kl_mean",
    "kl_max",
    "kl_max_prompt",
    "max_abs_logit_diff",
    "top10_overlap_min",
    "top10_jaccard_mean",
    "top10_rank_agreement_mean",
    "max_kl_threshold",
    "passed",
    "content_passed",
    "layout_passed",
    "precision_passed",
    "layout_kl_max",
}
# with --dtype bfloat16: precision (judged) and what it is made of
COMPARISONS = {"precision", "layout", "format", "hf_bf16", "bf16_compute"}


def test_report_files(converted, tmp_path):
    hf, ckpt = converted("qwen3", False)
    out = tmp_path / "report"
    r = verify(maxtext=ckpt, hf=hf, dtype="bfloat16", report_dir=out)
    assert set(r.report_files) == {"json", "markdown", "plot"}

    data = json.loads((out / "verify.json").read_text())
    assert data == json.loads(json.dumps(r.data))
    assert data["passed"] is True and data["dtype"] == "bfloat16" and data["max_kl"] == 0.015
    assert SUMMARY_FIELDS <= set(data["summary"])
    assert data["maxtext"]["layout"] == "unscanned" and data["reference"]["kind"] == "hf"
    assert len(data["prompts"]) == 4
    for p in data["prompts"]:
        assert PROMPT_FIELDS <= set(p)
        assert len(p["kl_per_token"]) == p["num_tokens"] == len(p["token_ids"])
        assert len(p["top10_ref"]) == len(p["top10_maxtext"]) == 10
        assert {"id", "logit"} <= set(p["top10_ref"][0])
    assert set(data["comparisons"]) == COMPARISONS == set(data["prompts"][0]["comparisons"])
    assert (
        data["verdict"]["content"]["passed"]
        and data["verdict"]["layout"]["passed"]
        and data["verdict"]["precision"]["passed"]
    )
    assert data["comparisons"]["precision"]["test"] == "maxtext_bf16"
    assert all(data["timing"][k] > 0 for k in ("hf", "hf_bf16", "maxtext", "maxtext_bf16", "total"))

    md = (out / "verify.md").read_text()
    assert md.startswith("# ckptflow verify: PASSED")
    assert "| content | does the checkpoint hold this source's weights? | pass |" in md
    assert "| layout | does MaxText compute the source model from it? | pass |" in md
    assert "| precision | what do the dtype and the format cost? | pass |" in md
    assert "| prompt | tokens | mean KL | max KL (position)" in md
    assert md.count("## Top-10 at the last position") == 4
    assert "| rank | HF id | HF token | HF logit | MaxText id | MaxText token | MaxText logit |" in md

    png = (out / "kl_per_token.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out / "kl_per_token.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert float(np.std(img)) > 0.01  # not a blank canvas


def test_markdown_escapes_token_text():
    p = {
        "name": "a",
        "label": "x|y",
        "num_tokens": 1,
        "kl_mean": 0.0,
        "kl_max": 0.0,
        "kl_argmax": 0,
        "max_abs_logit_diff": 0.0,
        "top10_overlap": 10,
        "top10_jaccard": 1.0,
        "top10_rank_agreement": 1.0,
        "passed": True,
        "top10_ref": [{"id": 5, "logit": 1.0, "token": "a|b\n"}],
        "top10_maxtext": [{"id": 6, "logit": 1.0, "token": " "}],
    }
    data = {
        "summary": {
            "passed": False,
            "max_kl_threshold": 0.1,
            "kl_mean": 0.0,
            "kl_max": float("nan"),
            "kl_max_prompt": "a",
            "max_abs_logit_diff": 0.0,
            "num_tokens": 1,
            "num_prompts": 1,
        },
        "verdict": {
            "content": {"ran": False, "passed": None, "why": "no source weights (golden file)"},
            "layout": {"ran": False, "passed": None, "why": "golden"},
            "precision": {"ran": True, "passed": False, "max_kl": 0.1, "kl_max": float("nan"), "explanation": []},
        },
        "comparisons": {
            "precision": {
                "description": "golden logits vs MaxText",
                "summary": {"kl_max": float("nan"), "kl_mean": 0.0, "max_abs_logit_diff": 0.0, "top1_agreement": 1.0},
            }
        },
        "reference": {"kind": "golden", "path": "g"},
        "maxtext": {"path": "m", "layout": "scanned", "model_type": "qwen3"},
        "dtype": "float32",
        "prompts": [p],
        "warnings": ["w"],
    }
    md = render_markdown(data)
    assert "`a\\|b\\n`" in md and "`x\\|y`" in md and "' '" in md
    assert "| 1 ≠ |" in md and "Golden id" in md and "> warning: w" in md and "FAILED" in md

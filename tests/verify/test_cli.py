"""`ckptflow verify` and `ckptflow golden` through the real CLI entry point (in-process)."""

from __future__ import annotations

import json

from converters.cli.main import main


def test_verify_passes_with_json(converted, capsys):
    hf, ckpt = converted("qwen2.5", True)
    rc = main(["verify", "--hf", str(hf), "--maxtext", str(ckpt), "--max-kl", "1e-5", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0
    data = json.loads(out)  # stdout carries only the JSON
    assert data["passed"] and data["summary"]["kl_max"] < 1e-5
    assert "verify PASSED" in err and "long" in err  # progress and verdict on stderr


def test_verify_failure_exit_code(damaged, capsys):
    hf, broken = damaged("llama3.1", "skip_rope_permutation", True)
    rc = main(["verify", "--hf", str(hf), "--maxtext", str(broken), "-q"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert "verify FAILED" in err and "prompt long" in err


def test_bad_input_exit_code(converted, tmp_path, capsys):
    hf, _ = converted("qwen3", True)
    rc = main(["verify", "--hf", str(hf), "--maxtext", str(tmp_path / "missing")])
    assert rc == 2 and "error:" in capsys.readouterr().err
    rc = main(["verify", "--hf", str(tmp_path), "--maxtext", str(tmp_path)])
    assert rc == 2


def test_golden_then_verify(converted, tmp_path, capsys):
    hf, ckpt = converted("qwen3", False)
    golden = tmp_path / "g.jsonl"
    assert main(["golden", "--hf", str(hf), "--out", str(golden), "-q"]) == 0
    assert golden.is_file() and len(golden.read_text().splitlines()) == 4
    report = tmp_path / "rep"
    rc = main(["verify", "--golden", str(golden), "--maxtext", str(ckpt), "--max-kl", "1e-5", "--report", str(report)])
    assert rc == 0
    assert {p.name for p in report.iterdir()} == {"verify.json", "verify.md", "kl_per_token.png"}
    assert "Golden id" in (report / "verify.md").read_text()
    capsys.readouterr()
    rc = main(["verify", "--hf", str(hf), "--maxtext", str(ckpt), "--hf-config", str(hf)])
    assert rc == 2 and "--hf-config" in capsys.readouterr().err

"""A stand-in `ckptflow` for operator tests: records its argv, writes the result files the real one writes.

Behaviour from the environment:
  FAKE_CKPTFLOW_STATE      folder for the call log (calls.jsonl) and try markers (required)
  FAKE_CKPTFLOW_FAIL_ONCE  a step name: its first call prints a traceback-like line and exits 1
  FAKE_CKPTFLOW_VERIFY     "fail": verify writes a report with passed=false and exits 1
  FAKE_CKPTFLOW_EXIT       "step:code": that step always exits with `code`
  FAKE_CKPTFLOW_HANG       a step name: it hangs (for timeout and kill tests)
A step name is the subcommand, or for a convert in parts `convert@I` (part I) or `finalize`.

`convert --part I/N` writes its share into the hidden staging sibling of OUT (replacing only its own share) and
`convert --finalize` checks that all N shares are there for the same command, writes OUT with a manifest listing
them and removes the staging folder, as the real one does (exit 2 with an `error:` line when a part is missing).
"""

import json
import os
import sys
import time
from pathlib import Path


def opt(args, name):
    return args[args.index(name) + 1] if name in args else None


def staging(out: Path) -> Path:
    return out.parent / f".{out.name}.ckptflow-parts"


def same_conversion(argv):
    """The command without --part/--finalize: every part and the finalize of one conversion share it."""
    drop = {i for i, a in enumerate(argv) if a == "--part" for i in (i, i + 1)} | {i for i, a in enumerate(argv) if a == "--finalize"}
    return [a for i, a in enumerate(argv) if i not in drop]


def convert_part(argv, part, parts):
    stage = staging(Path(argv[2]))
    stage.mkdir(parents=True, exist_ok=True)
    tmp = stage / f".part-{part}.tmp"
    tmp.write_text(json.dumps({"part": part, "parts": parts, "command": same_conversion(argv), "pid": os.getpid()}))
    tmp.replace(stage / f"part-{part}.json")  # a retry replaces this part's share only


def finalize(argv):
    out, stage = Path(argv[2]), staging(Path(argv[2]))
    records = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in stage.glob("part-*.json")}
    parts = next(iter(records.values()), {}).get("parts")
    for i in range(parts or 1):
        if i not in records or records[i]["command"] != same_conversion(argv) or records[i]["parts"] != parts:
            print(f"error: part {i}/{parts} is missing or from another conversion", file=sys.stderr)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "ckptflow-manifest.json").write_text(json.dumps({
        "family": "llama3.1", "ckptflow_version": "0.0-fake",
        "options": {"scan_layers": "--scan" in argv, "dtype": opt(argv, "--dtype")},
        "outputs": {"0/items/data": {"bytes": 3, "sha256": "ab" * 32}},
        "parts": [{"part": i, "pid": records[i]["pid"]} for i in range(parts)],
    }))
    for p in stage.iterdir():
        p.unlink()
    stage.rmdir()
    return 0


def main(argv):
    state = Path(os.environ["FAKE_CKPTFLOW_STATE"])
    state.mkdir(parents=True, exist_ok=True)
    step = argv[0]
    part = opt(argv, "--part")
    if part:
        step = f"convert@{part.partition('/')[0]}"
    elif "--finalize" in argv:
        step = "finalize"
    with open(state / "calls.jsonl", "a") as f:
        f.write(json.dumps({"argv": argv, "pid": os.getpid(), "hf_token": os.environ.get("HF_TOKEN"),
                            "airflow_env": sorted(k for k in os.environ if k.startswith("AIRFLOW__"))}) + "\n")
    print(f"fake ckptflow {step}: starting", flush=True)
    code = os.environ.get("FAKE_CKPTFLOW_EXIT", "")
    if code.partition(":")[0] == step:
        print("error: fake bad input", file=sys.stderr)
        return int(code.partition(":")[2])
    if os.environ.get("FAKE_CKPTFLOW_HANG") == step:
        time.sleep(600)
    marker = state / f"failed-once-{step}"
    if os.environ.get("FAKE_CKPTFLOW_FAIL_ONCE") == step and not marker.exists():
        marker.touch()
        print("RuntimeError: fake transient failure", file=sys.stderr)
        return 1
    if part:
        convert_part(argv, *map(int, part.split("/")))
    elif step == "finalize":
        if code := finalize(argv):
            return code
    elif step == "download":
        out = Path(argv[2])
        out.mkdir(parents=True, exist_ok=True)
        (out / "ckptflow-download.json").write_text(json.dumps(
            {"source": argv[1], "revision": "f" * 40 if opt(argv, "--revision") else None, "digest": "sha256:src"}))
    elif step == "convert":
        out = Path(argv[2])
        out.mkdir(parents=True, exist_ok=True)
        (out / "ckptflow-manifest.json").write_text(json.dumps({
            "family": "llama3.1", "ckptflow_version": "0.0-fake",
            "options": {"scan_layers": "--scan" in argv, "dtype": opt(argv, "--dtype")},
            "outputs": {"0/items/data": {"bytes": 3, "sha256": "ab" * 32}},
        }))
    elif step == "verify":
        passed = os.environ.get("FAKE_CKPTFLOW_VERIFY") != "fail"
        report = Path(opt(argv, "--report"))
        report.mkdir(parents=True, exist_ok=True)
        kl = 1e-7 if passed else 0.5
        (report / "verify.json").write_text(json.dumps({
            "dtype": "float32", "max_kl": float(opt(argv, "--max-kl")),
            "summary": {"passed": passed, "kl_max": kl, "kl_mean": kl / 2, "max_kl_threshold": float(opt(argv, "--max-kl"))},
        }))
        if not passed:
            print("verify FAILED", file=sys.stderr)
            return 1
    elif step == "publish":
        Path(opt(argv, "--receipt")).write_text(json.dumps(
            {"destination": argv[2], "digest": "sha256:pub", "status": "published"}))
    print(f"fake ckptflow {step}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

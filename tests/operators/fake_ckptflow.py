"""A stand-in `ckptflow` for operator tests: records its argv, writes the result files the real one writes.

Behaviour from the environment:
  FAKE_CKPTFLOW_STATE      folder for the call log (calls.jsonl) and try markers (required)
  FAKE_CKPTFLOW_FAIL_ONCE  a step name: its first call prints a traceback-like line and exits 1
  FAKE_CKPTFLOW_VERIFY     "fail": verify writes a report with passed=false and exits 1
  FAKE_CKPTFLOW_EXIT       "step:code": that step always exits with `code`
  FAKE_CKPTFLOW_HANG       a step name: it hangs (for timeout and kill tests)
"""

import json
import os
import sys
import time
from pathlib import Path


def opt(args, name):
    return args[args.index(name) + 1] if name in args else None


def main(argv):
    state = Path(os.environ["FAKE_CKPTFLOW_STATE"])
    state.mkdir(parents=True, exist_ok=True)
    step = argv[0]
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
    if step == "download":
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

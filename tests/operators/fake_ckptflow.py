"""A stand-in `ckptflow` for operator tests: records its argv, writes the result files the real one writes.

Behaviour from the environment:
  FAKE_CKPTFLOW_STATE      folder for the call log (calls.jsonl) and try markers (required)
  FAKE_CKPTFLOW_FAIL_ONCE  a step name: its first call prints a traceback-like line and exits 1
  FAKE_CKPTFLOW_VERIFY     "fail": verify writes a report with passed=false and exits 1
  FAKE_CKPTFLOW_EXIT       "step:code": that step always exits with `code`
  FAKE_CKPTFLOW_HANG       a step name: it hangs (for timeout and kill tests)
  FAKE_CKPTFLOW_SLEEP      "step:seconds": that step takes this long (a pod still running when its worker dies)
A step name is the subcommand, or for a step in parts `convert@I` / `download@I` (part I), `finalize` (convert's)
or `download_finalize`.

`convert --part I/N` writes its share into the hidden staging sibling of OUT (replacing only its own share) and
`convert --finalize` checks that all N shares are there for the same command, writes OUT with a manifest listing
them and removes the staging folder, as the real one does (exit 2 with an `error:` line when a part is missing).
`download --part I/N` of a hub repo records its part in a staging sibling of OUT (a local folder's part does
nothing) and `download --finalize` checks every part is recorded for the same command before writing OUT as a
plain download does (exit 2 with an `error:` line naming a missing part).
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


def download_staging(out: Path) -> Path:
    return out.parent / f".{out.name}.ckptflow-partial-fake"


def is_local(source: str) -> bool:
    return source.startswith(("/", "file://"))


def same_conversion(argv):
    """The command without --part/--finalize: every part and the finalize of one download or conversion share it."""
    drop = {i for i, a in enumerate(argv) if a == "--part" for i in (i, i + 1)} | {
        i for i, a in enumerate(argv) if a == "--finalize"
    }
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
    (out / "ckptflow-manifest.json").write_text(
        json.dumps(
            {
                "family": "llama3.1",
                "ckptflow_version": "0.0-fake",
                "options": {"scan_layers": "--scan" in argv, "dtype": opt(argv, "--dtype")},
                "outputs": {"0/items/data": {"bytes": 3, "sha256": "ab" * 32}},
                "parts": [{"part": i, "pid": records[i]["pid"]} for i in range(parts)],
            }
        )
    )
    for p in stage.iterdir():
        p.unlink()
    stage.rmdir()
    return 0


def download_part(argv, part, parts):
    if is_local(argv[1]):
        return  # a local folder has nothing to split
    stage = download_staging(Path(argv[2]))
    stage.mkdir(parents=True, exist_ok=True)
    record = {"part": part, "parts": parts, "command": same_conversion(argv), "pid": os.getpid()}
    (stage / f"part-{part}.json").write_text(json.dumps(record))


def download_finalize(argv):
    """Exit status 2 naming the first missing part; else the recorded parts (empty for a local source)."""
    stage = download_staging(Path(argv[2]))
    records = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in stage.glob("part-*.json")}
    if not is_local(argv[1]):
        parts = next(iter(records.values()), {}).get("parts") or 1
        for i in range(parts):
            if i not in records or records[i]["command"] != same_conversion(argv):
                print(f"error: download part {i}/{parts} not finished; run it, then finalize again", file=sys.stderr)
                return 2, None
    for p in stage.glob("*"):
        p.unlink()
    if stage.exists():
        stage.rmdir()
    return 0, [records[i]["pid"] for i in sorted(records)]


def write_download(argv, part_pids=None):
    out = Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    (out / "ckptflow-download.json").write_text(
        json.dumps(
            {
                "source": argv[1],
                "revision": "f" * 40 if opt(argv, "--revision") else None,
                "digest": "sha256:src",
                **({"part_pids": part_pids} if part_pids else {}),
            }
        )
    )


def main(argv):
    state = Path(os.environ["FAKE_CKPTFLOW_STATE"])
    state.mkdir(parents=True, exist_ok=True)
    step = argv[0]
    part = opt(argv, "--part")
    if part:
        step = f"{argv[0]}@{part.partition('/')[0]}"
    elif "--finalize" in argv:
        step = "download_finalize" if argv[0] == "download" else "finalize"
    with open(state / "calls.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "argv": argv,
                    "pid": os.getpid(),
                    "hf_token": os.environ.get("HF_TOKEN"),
                    "airflow_env": sorted(k for k in os.environ if k.startswith("AIRFLOW__")),
                }
            )
            + "\n"
        )
    print(f"fake ckptflow {step}: starting", flush=True)
    code = os.environ.get("FAKE_CKPTFLOW_EXIT", "")
    if code.partition(":")[0] == step:
        print("error: fake bad input", file=sys.stderr)
        return int(code.partition(":")[2])
    if os.environ.get("FAKE_CKPTFLOW_HANG") == step:
        time.sleep(600)
    sleep = os.environ.get("FAKE_CKPTFLOW_SLEEP", "")
    if sleep.partition(":")[0] == step:
        time.sleep(float(sleep.partition(":")[2]))
    marker = state / f"failed-once-{step}"
    if os.environ.get("FAKE_CKPTFLOW_FAIL_ONCE") == step and not marker.exists():
        marker.touch()
        print("RuntimeError: fake transient failure", file=sys.stderr)
        return 1
    if part:
        (download_part if argv[0] == "download" else convert_part)(argv, *map(int, part.split("/")))
    elif step == "finalize":
        if code := finalize(argv):
            return code
    elif step == "download_finalize":
        code, pids = download_finalize(argv)
        if code:
            return code
        write_download(argv, pids)
    elif step == "download":
        write_download(argv)
    elif step == "convert":
        out = Path(argv[2])
        out.mkdir(parents=True, exist_ok=True)
        (out / "ckptflow-manifest.json").write_text(
            json.dumps(
                {
                    "family": "llama3.1",
                    "ckptflow_version": "0.0-fake",
                    "options": {"scan_layers": "--scan" in argv, "dtype": opt(argv, "--dtype")},
                    "outputs": {"0/items/data": {"bytes": 3, "sha256": "ab" * 32}},
                }
            )
        )
    elif step == "verify":
        passed = os.environ.get("FAKE_CKPTFLOW_VERIFY") != "fail"
        report = Path(opt(argv, "--report"))
        report.mkdir(parents=True, exist_ok=True)
        kl = 1e-7 if passed else 0.5
        (report / "verify.json").write_text(
            json.dumps(
                {
                    "dtype": "float32",
                    "max_kl": float(opt(argv, "--max-kl")),
                    "summary": {
                        "passed": passed,
                        "kl_max": kl,
                        "kl_mean": kl / 2,
                        "max_kl_threshold": float(opt(argv, "--max-kl")),
                    },
                }
            )
        )
        if not passed:
            print("verify FAILED", file=sys.stderr)
            return 1
    elif step == "publish":
        Path(opt(argv, "--receipt")).write_text(
            json.dumps({"destination": argv[2], "digest": "sha256:pub", "status": "published"})
        )
    print(f"fake ckptflow {step}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

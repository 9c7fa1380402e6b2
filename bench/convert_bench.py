"""Conversion benchmark: wall time, throughput and peak RSS against `cp -r` + `sync` of the same bytes.

Builds a synthetic HF checkpoint with real dimensions (default Llama 3.1 8B, `--layers N`), then in one
run measures: the disk limit (`cp -r` of the source folder + `sync`), HF -> MaxText scanned and
unscanned, and MaxText -> HF, in rounds (`--repeat`, default 3: the median counts). Every step runs as its
own process (the real `ckptflow` CLI), from a cold page cache; its peak resident memory is sampled over the
whole process tree. Prints a table and writes JSON.

  python bench/convert_bench.py --layers 8 --out /tmp/bench --json bench-8.json
  python bench/convert_bench.py --sizes 2,4,8 --plot docs/performance.png   # a sweep and its plot
  python bench/convert_bench.py --layers 8 --parts 1,2,4                    # scale-out: N local part processes

`--parts` runs each direction as N concurrent `--part I/N` processes plus `--finalize` and reports the wall
time of the parts, of finalize, the per-part peak RSS and each part's own throughput (its share of the bytes
over its own wall time), the number that scale-out estimates are built on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import PeakRSS, dir_bytes, drop_caches, pyplot, run_measured, synthetic_model


def warm_memory(src: Path, work: Path) -> None:
    """Copy `src` once and delete the copy (untimed), so that the memory the next step gets was in use moments ago.

    On a VM with free page reporting (this machine: Firecracker) memory freed a while ago is handed back to the
    host and faulted back in, zeroed, on next use: `cp` of 5.6 GB measured 5.8-6.8 s right after another copy and
    15-20 s after a pause, the page-cache-heavy steps most. Warmed, every step runs in the first regime, the one
    closer to a machine of its own."""
    tmp = work / "warm-copy"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["cp", "-r", str(src), str(tmp)], check=True)
    shutil.rmtree(tmp)


def measure(name: str, cmd: list[str], nbytes: int, cold: bool, warm_from: tuple[Path, Path] | None = None) -> dict:
    if warm_from is not None:
        warm_memory(*warm_from)
    r = run_measured(cmd, cold=cold)  # the clock counts the flush to disk, as for cp
    if r.returncode:
        raise SystemExit(f"{name} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return {
        "step": name,
        "wall_s": r.wall_s,
        "GB_per_s": round(nbytes / 1e9 / r.wall_s, 3),
        "peak_rss_GB": r.peak_rss_GB,
    }


def measure_parts(name: str, cmd: list[str], n: int, nbytes: int, cold: bool) -> dict:
    """Run `cmd --part I/N` for every I at once; then `cmd --finalize`. Per-part wall time and peak RSS."""
    if cold:
        drop_caches()
    t0 = time.monotonic()
    procs = []
    for i in range(n):
        p = subprocess.Popen(cmd + ["--part", f"{i}/{n}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append((p, PeakRSS(p.pid), time.monotonic()))
    walls, peaks = [], []
    for p, mon, started in procs:
        _, err = p.communicate()
        walls.append(time.monotonic() - started)
        peaks.append(mon.stop())
        if p.returncode:
            raise SystemExit(f"{name} part failed ({p.returncode}):\n{err[-2000:]}")
    subprocess.run(["sync"], check=True)
    parts_wall = time.monotonic() - t0
    fin = measure(f"{name} finalize", cmd + ["--finalize"], nbytes, cold=False)
    total = parts_wall + fin["wall_s"]
    return {
        "step": f"{name}, {n} part(s)",
        "parts": n,
        "wall_s": round(total, 2),
        "parts_wall_s": round(parts_wall, 2),
        "finalize_s": fin["wall_s"],
        "GB_per_s": round(nbytes / 1e9 / total, 3),
        "part_GB_per_s": round(nbytes / n / 1e9 / (sum(walls) / n), 3),
        "peak_rss_GB": round(max(peaks) / 1e9, 3),
        "finalize_peak_rss_GB": fin["peak_rss_GB"],
    }


def run_parts(model: str, layers: int, work: Path, counts: list[int], cold: bool, keep: bool) -> dict:
    """Scale-out sweep: both directions split into N local processes, for each N in `counts`."""
    src = synthetic_model(model, layers, work / f"hf-{layers}")
    nbytes = dir_bytes(src)
    ck = [sys.executable, "-m", "converters", "convert"]
    shard = ["--shard-size", "512MB"]  # enough shards to give each of N parts some (the same for every N)
    rows = []
    for n in counts:
        for d in ("mt-parts", "hf-parts"):
            shutil.rmtree(work / d, ignore_errors=True)
        print(f"  {n} part(s) ...", file=sys.stderr)
        rows.append(
            measure_parts(
                "hf->maxtext scanned", ck + [str(src), str(work / "mt-parts"), "--to", "maxtext", "-q"], n, nbytes, cold
            )
        )
        rows.append(
            measure_parts(
                "maxtext->hf",
                ck + [str(work / "mt-parts"), str(work / "hf-parts"), "--to", "hf", "-q", *shard],
                n,
                nbytes,
                cold,
            )
        )
    if not keep:
        for d in ("mt-parts", "hf-parts"):
            shutil.rmtree(work / d, ignore_errors=True)
    return {"model": model, "layers": layers, "model_GB": round(nbytes / 1e9, 3), "parts": rows}


def print_parts(res: dict) -> None:
    print(f"\n{res['model']} x {res['layers']} layers ({res['model_GB']:.2f} GB), scale-out on this machine:")
    print(f"{'step':<34}{'wall s':>8}{'parts s':>9}{'final s':>9}{'GB/s':>8}{'part GB/s':>11}{'part RSS GB':>13}")
    for r in res["parts"]:
        print(
            f"{r['step']:<34}{r['wall_s']:>8.2f}{r['parts_wall_s']:>9.2f}{r['finalize_s']:>9.2f}{r['GB_per_s']:>8.3f}"
            f"{r['part_GB_per_s']:>11.3f}{r['peak_rss_GB']:>13.3f}"
        )


def run_one(
    model: str,
    layers: int,
    work: Path,
    extra: list[str],
    cold: bool,
    keep: bool,
    repeat: int = 1,
    warm_vm: bool = False,
) -> dict:
    src = synthetic_model(model, layers, work / f"hf-{layers}")
    nbytes = dir_bytes(src)
    ck = [sys.executable, "-m", "converters", "convert"]
    steps = [  # (name, output folder, command)
        ("cp -r + sync", "cp-copy", ["cp", "-r", str(src), str(work / "cp-copy")]),
        (
            "hf->maxtext scanned",
            "mt-scan",
            ck + [str(src), str(work / "mt-scan"), "--to", "maxtext", "--scan", "-q", *extra],
        ),
        (
            "hf->maxtext unscanned",
            "mt-noscan",
            ck + [str(src), str(work / "mt-noscan"), "--to", "maxtext", "--no-scan", "-q", *extra],
        ),
        (
            "maxtext->hf (from scanned)",
            "hf-back",
            ck + [str(work / "mt-scan"), str(work / "hf-back"), "--to", "hf", "-q"],
        ),
    ]
    # Rounds of every step in turn, so that the disk's and the VM's moods (cp alone varied 6-20 s for the same
    # 5.6 GB here) fall on every step alike; each step reports its median, fastest and slowest round.
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in steps}
    for k in range(repeat):
        for name, target, cmd in steps:
            shutil.rmtree(work / target, ignore_errors=True)
            print(f"  {name} (round {k + 1}/{repeat}) ...", file=sys.stderr)
            runs[name].append(measure(name, cmd, nbytes, cold, (src, work) if warm_vm else None))
    rows = []
    for name, _, _ in steps:
        walls = sorted(r["wall_s"] for r in runs[name])
        wall = statistics.median(walls)
        rows.append(
            {
                "step": name,
                "wall_s": round(wall, 2),
                "wall_min_s": walls[0],
                "wall_max_s": walls[-1],
                "GB_per_s": round(nbytes / 1e9 / wall, 3),
                "peak_rss_GB": max(r["peak_rss_GB"] for r in runs[name]),
            }
        )
    base = rows[0]["wall_s"]
    for r in rows:
        r["x_cp"] = round(r["wall_s"] / base, 2)
    if not keep:
        for d in ("cp-copy", "mt-scan", "mt-noscan", "hf-back"):
            shutil.rmtree(work / d, ignore_errors=True)
    return {
        "model": model,
        "layers": layers,
        "model_GB": round(nbytes / 1e9, 3),
        "rounds": repeat,
        "warm_vm": warm_vm,
        "steps": rows,
    }


def print_table(results: list[dict]) -> None:
    print(
        f"{'model':<14}{'layers':>7}{'GB':>8}  "
        f"{'step':<28}{'wall s':>8}{'range s':>14}{'GB/s':>8}{'x cp':>7}{'peak RSS GB':>13}"
    )
    for res in results:
        for r in res["steps"]:
            spread = f"{r.get('wall_min_s', r['wall_s']):.1f}-{r.get('wall_max_s', r['wall_s']):.1f}"
            print(
                f"{res['model']:<14}{res['layers']:>7}{res['model_GB']:>8.2f}  "
                f"{r['step']:<28}{r['wall_s']:>8.2f}{spread:>14}"
                f"{r['GB_per_s']:>8.3f}{r['x_cp']:>7.2f}{r['peak_rss_GB']:>13.3f}"
            )


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| model dims | layers | model GB | step | wall s (median) | fastest-slowest s | GB/s | x cp | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["steps"]:
            spread = f"{r.get('wall_min_s', r['wall_s']):.1f}-{r.get('wall_max_s', r['wall_s']):.1f}"
            lines.append(
                f"| {res['model']} | {res['layers']} | {res['model_GB']:.2f} | {r['step']} | {r['wall_s']:.1f} | "
                f"{spread} | "
                f"{r['GB_per_s']:.3f} | {r['x_cp']:.2f} | {r['peak_rss_GB']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def parts_markdown(res: dict) -> str:
    lines = [
        "",
        f"{res['model']} dims, {res['layers']} layers, {res['model_GB']:.2f} GB, N local part processes + finalize:",
        "",
        "| step | wall s | parts s | finalize s | GB/s | per-part GB/s | per-part peak RSS GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["parts"]:
        lines.append(
            f"| {r['step']} | {r['wall_s']:.1f} | {r['parts_wall_s']:.1f} | {r['finalize_s']:.1f} | "
            f"{r['GB_per_s']:.3f} | "
            f"{r['part_GB_per_s']:.3f} | {r['peak_rss_GB']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["step"] for r in results[0]["steps"]]
    sizes = [r["model_GB"] for r in results]
    for n in names:
        a.plot(sizes, [next(s["wall_s"] for s in r["steps"] if s["step"] == n) for r in results], marker="o", label=n)
        b.plot(
            sizes, [next(s["peak_rss_GB"] for s in r["steps"] if s["step"] == n) for r in results], marker="o", label=n
        )
    a.set(xlabel="model size (GB)", ylabel="wall time (s)", title="time vs cp")
    b.set(xlabel="model size (GB)", ylabel="peak RSS (GB)", title="peak resident memory")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3.1-8b", help="real dimensions to use (default llama3.1-8b)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    p.add_argument("--sizes", help="comma-separated layer counts for a sweep (overrides --layers)")
    p.add_argument("--out", type=Path, default=Path("/tmp/ckptflow-bench"), help="work folder (on the disk to measure)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write a time/RSS plot (PNG) here")
    p.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    p.add_argument("--warm", action="store_true", help="do not drop the page cache between steps")
    p.add_argument("--keep", action="store_true", help="keep converted outputs")
    p.add_argument(
        "--warm-vm",
        action="store_true",
        help="before every step, copy the source once (untimed) so the "
        "memory it gets was just in use: on VMs that hand freed memory back to the host, the regime closer to "
        "a machine of its own (see warm_memory)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of every step; each reports its median, fastest and slowest round (default 3)",
    )
    p.add_argument(
        "--compare-maxtext",
        action="store_true",
        help="also run MaxText's to_maxtext when the maxtext package is importable",
    )
    p.add_argument("--parts", help="comma-separated part counts (e.g. 1,2,4): also run the scale-out sweep at --layers")
    p.add_argument("convert_args", nargs="*", help="extra args passed to `ckptflow convert --to maxtext` (after --)")
    a = p.parse_args()
    layers = [int(x) for x in a.sizes.split(",")] if a.sizes else [a.layers]
    a.out.mkdir(parents=True, exist_ok=True)
    results = [
        run_one(a.model, n, a.out, a.convert_args, not a.warm, a.keep, max(1, a.repeat), a.warm_vm) for n in layers
    ]
    if a.compare_maxtext:
        try:
            import maxtext  # noqa: F401
        except ImportError:
            print("--compare-maxtext: the maxtext package is not importable here; skipped", file=sys.stderr)
        else:  # pragma: no cover - needs MaxText (Python >= 3.12, ~7 GB)
            src = a.out / f"hf-{layers[-1]}"
            cmd = [
                sys.executable,
                "-m",
                "maxtext.checkpoint_conversion.to_maxtext",
                "maxtext/configs/base.yml",
                f"model_name={a.model}",
                f"base_output_directory={a.out / 'maxtext-own'}",
                "scan_layers=true",
                f"--hf_model_path={src}",
                "--simulated_cpu_devices_count=1",
            ]
            results[-1]["steps"].append(measure("maxtext to_maxtext", cmd, dir_bytes(src), not a.warm))
    print_table(results)
    if a.parts:
        scale = run_parts(a.model, layers[-1], a.out, [int(x) for x in a.parts.split(",")], not a.warm, a.keep)
        print_parts(scale)
        results.append(scale)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    sweep = [r for r in results if "steps" in r]
    if a.plot:
        plot(sweep, a.plot)
    if a.markdown:
        a.markdown.write_text(markdown_table(sweep) + "".join(parts_markdown(r) for r in results if "parts" in r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

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

Models too large for the disk (Kimi-K2, Qwen3.5-397B): a few layers of the real dimensions, the steps picked with
`--steps`, one part run alone with `--part I/N` / `--export-part I/N`, outputs deleted as soon as possible with
`--lean` (and the source with `--drop-source`), Kimi-K2-Thinking's int4 experts with `--int4`, DeepSeek-V4's FP4
experts and FP8 linears with `--fp4`; `--estimate`
extrapolates each step to the real depth over 1/16/64 pods (docs/performance.md, "Kimi-K2 (1T) and Qwen3.5-397B"):

  python bench/convert_bench.py --model kimi-k2-1t --layers 2 --steps scan --part 0/2 --repeat 1 --lean --estimate
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

from measure import PeakRSS, dir_bytes, drop_caches, pyplot, run_measured, synthetic_model, synthetic_params

from converters.core import registry


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


def measure(
    name: str,
    cmd: list[str],
    nbytes: int,
    cold: bool,
    warm_from: tuple[Path, Path] | None = None,
    out: Path | None = None,
) -> dict:
    if warm_from is not None:
        warm_memory(*warm_from)
    r = run_measured(cmd, cold=cold)  # the clock counts the flush to disk, as for cp
    if r.returncode:
        raise SystemExit(f"{name} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    row = {
        "step": name,
        "wall_s": r.wall_s,
        "GB_per_s": round(nbytes / 1e9 / r.wall_s, 3),
        "peak_rss_GB": r.peak_rss_GB,
        "others_cpu_share": r.others_cpu_share,
    }
    if out is not None:  # what the step wrote (a part's share of the model): its own throughput
        written = sum(dir_bytes(d) for d in written_dirs(out))
        row["out_GB"] = round(written / 1e9, 3)
        row["out_GB_per_s"] = round(written / 1e9 / r.wall_s, 3)
    return row


def written_dirs(out: Path) -> list[Path]:
    """`out` and the parts folder `--part I/N` writes beside it (`.OUT.ckptflow-parts`), those that exist."""
    return [d for d in (out, out.parent / f".{out.name}.ckptflow-parts") if d.exists()]


def remove_output(out: Path) -> None:
    for d in written_dirs(out):
        shutil.rmtree(d, ignore_errors=True)


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


STEPS = {
    "cp": "cp -r + sync",
    "scan": "hf->maxtext scanned",
    "noscan": "hf->maxtext unscanned",
    "export": "maxtext->hf",
}


def run_one(
    model: str,
    layers: int,
    work: Path,
    extra: list[str],
    cold: bool,
    keep: bool,
    repeat: int = 1,
    warm_vm: bool = False,
    steps: tuple[str, ...] = ("cp", "scan", "noscan", "export"),
    part: str | None = None,
    export_part: str | None = None,
    quant: str | None = None,
    lean: bool = False,
    drop_source: bool = False,
) -> dict:
    """`steps` (keys of STEPS) in rounds. `part` / `export_part`: the imports / the export run as that one part
    `I/N` alone (one pod's share, no finalize; the export reads a full scanned import, or else the unscanned one).
    `lean`: each output is deleted as soon as no later step of the round needs it, and with `drop_source` the
    source after its last reader (for models whose source and outputs do not fit on the disk together)."""
    src = synthetic_model(model, layers, work / f"hf-{layers}{'-' + quant if quant else ''}", quant)
    nbytes = dir_bytes(src)
    ck = [sys.executable, "-m", "converters", "convert"]
    imp = ["--part", part] if part else []
    exp_src = "mt-scan" if "scan" in steps else "mt-noscan"
    if "export" in steps and not {"scan", "noscan"} & set(steps):
        raise SystemExit("--steps export needs an import step (scan or noscan) to export from")
    if "export" in steps and part:
        raise SystemExit("--part splits the imports; the export reads a whole checkpoint: use --export-part")
    shard = ["--shard-size", "512MB"] if export_part else []  # enough shards to give each part some
    table = {  # key: (name, output folder, command)
        "cp": ("cp -r + sync", "cp-copy", ["cp", "-r", str(src), str(work / "cp-copy")]),
        "scan": ("hf->maxtext scanned", "mt-scan", ck + [str(src), str(work / "mt-scan"), "--to", "maxtext"]),
        "noscan": ("hf->maxtext unscanned", "mt-noscan", ck + [str(src), str(work / "mt-noscan"), "--to", "maxtext"]),
        "export": ("maxtext->hf", "hf-back", ck + [str(work / exp_src), str(work / "hf-back"), "--to", "hf"]),
    }
    table["scan"][2].extend(["--scan", "-q", *imp, *extra])
    table["noscan"][2].extend(["--no-scan", "-q", *imp, *extra])
    table["export"][2].extend(["-q", *shard, *(["--part", export_part] if export_part else [])])
    order = [k for k in STEPS if k in steps]
    suffix = {"scan": f", part {part}" if part else "", "noscan": f", part {part}" if part else ""}
    frm = "scanned" if exp_src == "mt-scan" else "unscanned"
    suffix["export"] = f" (from {frm}{f', part {export_part}' if export_part else ''})"
    if quant:
        suffix["scan"] = suffix.get("scan", "") + f", {quant} source"
        suffix["noscan"] = suffix.get("noscan", "") + f", {quant} source"
    names = {k: table[k][0] + suffix.get(k, "") for k in order}
    # Rounds of every step in turn, so that the disk's and the VM's moods (cp alone varied 6-20 s for the same
    # 5.6 GB here) fall on every step alike; each step reports its median, fastest and slowest round.
    runs: dict[str, list[dict]] = {k: [] for k in order}
    for k in range(repeat):
        if k and drop_source and not src.exists():
            raise SystemExit("--drop-source deletes the source: one round only")
        for i, key in enumerate(order):
            _, target, cmd = table[key]
            remove_output(work / target)
            print(f"  {names[key]} (round {k + 1}/{repeat}) ...", file=sys.stderr)
            runs[key].append(
                measure(names[key], cmd, nbytes, cold, (src, work) if warm_vm else None, out=work / target)
            )
            later = order[i + 1 :]
            if lean and not (key == exp_src[3:] and "export" in later):
                remove_output(work / target)
            if lean and key == "export":
                remove_output(work / exp_src)
            if drop_source and k == repeat - 1 and src.exists() and not {"cp", "scan", "noscan"} & set(later):
                print(f"  --drop-source: deleting {src}", file=sys.stderr)
                shutil.rmtree(src, ignore_errors=True)
    rows = []
    for key in order:
        walls = sorted(r["wall_s"] for r in runs[key])
        wall = statistics.median(walls)
        row = {
            "step": names[key],
            "wall_s": round(wall, 2),
            "wall_min_s": walls[0],
            "wall_max_s": walls[-1],
            "GB_per_s": round(nbytes / 1e9 / wall, 3),
            "peak_rss_GB": max(r["peak_rss_GB"] for r in runs[key]),
            "others_cpu_share": max(r["others_cpu_share"] for r in runs[key]),
        }
        if key != "cp":
            out = statistics.median(r["out_GB"] for r in runs[key])
            row.update(out_GB=out, out_GB_per_s=round(out / wall, 3))
        rows.append(row)
    base = rows[0]["wall_s"] if order[0] == "cp" else None
    for r in rows:
        r["x_cp"] = round(r["wall_s"] / base, 2) if base else None
    if not keep:
        for d in ("cp-copy", "mt-scan", "mt-noscan", "hf-back"):
            remove_output(work / d)
    return {
        "model": model,
        "layers": layers,
        "model_GB": round(nbytes / 1e9, 3),
        "source": f"{quant} experts" if quant else "bf16",
        "rounds": repeat,
        "warm_vm": warm_vm,
        "steps": rows,
    }


def print_table(results: list[dict]) -> None:
    print(
        f"{'model':<14}{'layers':>7}{'GB':>8}  "
        f"{'step':<28}{'wall s':>8}{'range s':>14}{'GB/s':>8}{'x cp':>7}{'peak RSS GB':>13}{'out GB':>8}{'out GB/s':>9}"
    )
    for res in results:
        for r in res["steps"]:
            spread = f"{r.get('wall_min_s', r['wall_s']):.1f}-{r.get('wall_max_s', r['wall_s']):.1f}"
            print(
                f"{res['model']:<14}{res['layers']:>7}{res['model_GB']:>8.2f}  "
                f"{r['step']:<28}{r['wall_s']:>8.2f}{spread:>14}"
                f"{r['GB_per_s']:>8.3f}{r['x_cp'] or 0:>7.2f}{r['peak_rss_GB']:>13.3f}"
                f"{r.get('out_GB', 0):>8.2f}{r.get('out_GB_per_s', 0):>9.3f}"
            )


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| model dims | layers | model GB | step | wall s (median) | fastest-slowest s | GB/s | x cp | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["steps"]:
            spread = f"{r.get('wall_min_s', r['wall_s']):.1f}-{r.get('wall_max_s', r['wall_s']):.1f}"
            xcp = "" if r["x_cp"] is None else f"{r['x_cp']:.2f}"
            lines.append(
                f"| {res['model']} | {res['layers']} | {res['model_GB']:.2f} | {r['step']} | {r['wall_s']:.1f} | "
                f"{spread} | "
                f"{r['GB_per_s']:.3f} | {xcp} | {r['peak_rss_GB']:.2f} |"
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


def estimate(res: dict, pods: tuple[int, ...] = (1, 16, 64), storage_GB_per_s: float = 10.0) -> dict:
    """Extrapolate a run on a few layers to the model's real depth split over N pods (one part each).

    Every step's own rate is what it wrote (bf16 arrays, or a part's share) over its wall time; the full model
    writes `synthetic_params(model, real depth)` bf16 values, N parts 1/N of that each, so a pod's time is its
    share over that rate (per byte = per layer: all repeated layers have the same bytes; start-up, ~1-2 s, and
    finalize, metadata only, not counted). Peak RSS does not grow with depth (see docs/performance.md), so a pod's
    peak is the measured one. Storage must carry N x the rate in writes, and in reads N x the rate x (source
    bytes / bf16 bytes)."""
    cfg = registry.model(res["model"])[1]
    full_layers = cfg.get("text_config", cfg)["num_hidden_layers"]
    full_GB = synthetic_params(res["model"], full_layers) * 2 / 1e9
    bf16_GB = synthetic_params(res["model"], res["layers"]) * 2 / 1e9
    read_ratio = res["model_GB"] / bf16_GB
    rows = []
    for r in res["steps"]:
        rate = r.get("out_GB_per_s")
        if not rate:
            continue
        ratio = 1.0 if r["step"].startswith("maxtext->hf") else read_ratio
        for n in pods:
            t = full_GB / n / rate
            write = n * rate
            rows.append(
                {
                    "step": r["step"],
                    "pods": n,
                    "pod_GB": round(full_GB / n, 1),
                    "pod_wall_s": round(t),
                    "pod_peak_rss_GB": r["peak_rss_GB"],
                    "write_GB_per_s": round(write, 2),
                    "read_GB_per_s": round(write * ratio, 2),
                    "wall_s_storage_limited": round(max(t, full_GB / storage_GB_per_s)),
                }
            )
    return {"model": res["model"], "full_layers": full_layers, "full_bf16_GB": round(full_GB, 1), "rows": rows}


def hms(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 5400 else f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"


def estimate_markdown(est: dict, storage_GB_per_s: float = 10.0) -> str:
    lines = [
        "",
        f"{est['model']}, {est['full_layers']} layers, {est['full_bf16_GB']} GB of bf16 arrays, one part per pod:",
        "",
        "| step (rate as measured) | pods | GB per pod | wall per pod | peak RSS per pod GB | storage write GB/s "
        f"| storage read GB/s | wall with {storage_GB_per_s:g} GB/s storage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in est["rows"]:
        lines.append(
            f"| {r['step']} | {r['pods']} | {r['pod_GB']} | {hms(r['pod_wall_s'])} | {r['pod_peak_rss_GB']:.2f} | "
            f"{r['write_GB_per_s']} | {r['read_GB_per_s']} | {hms(r['wall_s_storage_limited'])} |"
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
    p.add_argument(
        "--steps",
        default="cp,scan,noscan,export",
        help="comma-separated steps to run: cp, scan, noscan, export (default all; the export reads the scanned "
        "import, or the unscanned one without scan)",
    )
    p.add_argument("--part", help="run the imports as this one part I/N alone: one pod's share (no finalize)")
    p.add_argument("--export-part", help="run the export as this one part I/N alone (512 MB shards)")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--int4",
        dest="quant",
        action="store_const",
        const="int4",
        help="synthetic source with int4 routed experts (compressed-tensors pack-quantized, as Kimi-K2-Thinking)",
    )
    source.add_argument(
        "--fp4",
        dest="quant",
        action="store_const",
        const="fp4",
        help="synthetic source with FP4 routed experts and FP8 linears, UE8M0 scales (as DeepSeek-V4-Flash)",
    )
    p.add_argument(
        "--lean",
        action="store_true",
        help="delete every output as soon as no later step needs it (large models on a small disk)",
    )
    p.add_argument(
        "--drop-source",
        action="store_true",
        help="with --lean: also delete the synthetic source after its last reader (then the export has the disk)",
    )
    p.add_argument(
        "--estimate",
        action="store_true",
        help="extrapolate each conversion step to the model's real depth over 1/16/64 pods (wall, RSS, storage)",
    )
    p.add_argument("convert_args", nargs="*", help="extra args passed to `ckptflow convert --to maxtext` (after --)")
    a = p.parse_args()
    layers = [int(x) for x in a.sizes.split(",")] if a.sizes else [a.layers]
    a.out.mkdir(parents=True, exist_ok=True)
    steps = tuple(x for x in a.steps.split(",") if x)
    if set(steps) - set(STEPS):
        p.error(f"--steps: unknown {sorted(set(steps) - set(STEPS))}; choose from {list(STEPS)}")
    results = [
        run_one(
            a.model,
            n,
            a.out,
            a.convert_args,
            not a.warm,
            a.keep,
            max(1, a.repeat),
            a.warm_vm,
            steps=steps,
            part=a.part,
            export_part=a.export_part,
            quant=a.quant,
            lean=a.lean,
            drop_source=a.drop_source,
        )
        for n in layers
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
    estimates = [estimate(r) for r in results] if a.estimate else []
    for est in estimates:
        print(estimate_markdown(est))
    if a.parts:
        scale = run_parts(a.model, layers[-1], a.out, [int(x) for x in a.parts.split(",")], not a.warm, a.keep)
        print_parts(scale)
        results.append(scale)
    if a.json:
        a.json.write_text(json.dumps(results + [{"estimate": e} for e in estimates], indent=2) + "\n")
    sweep = [r for r in results if "steps" in r]
    if a.plot:
        plot(sweep, a.plot)
    if a.markdown:
        a.markdown.write_text(
            markdown_table(sweep)
            + "".join(parts_markdown(r) for r in results if "parts" in r)
            + "".join(estimate_markdown(e) for e in estimates)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

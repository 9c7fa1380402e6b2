"""Verification benchmark: wall time and peak RSS of `ckptflow verify` against one plain transformers forward pass.

What it measures. Synthetic checkpoints with real dimensions (random bf16 weights, built on disk tensor by
tensor: bench/measure.py): Llama 3.1 8B with `--llama-layers` decoder layers (32 is the real 8B: 16 GB of
safetensors) and Qwen3-30B-A3B (mixture of experts, 128 experts, top-8) with `--moe-layers` layers. Each is
converted once to a scanned bf16 MaxText checkpoint (`ckptflow convert HF OUT --to maxtext --scan`). Then, in
every round (`--rounds`, the median counts), each step runs as its own process from a cold page cache while the
summed RSS of its process tree is sampled every 50 ms:

  baseline   one plain transformers forward pass in float32: AutoModelForCausalLM.from_pretrained(HF,
             dtype=float32, attn_implementation="eager"), then one forward per verify prompt (the tokenizer-less
             defaults, build_prompts(tokenizer=None, vocab_size=V, seed=0); use_cache=False, torch.no_grad());
             load and forward are timed separately
  verify     `ckptflow verify --hf HF --maxtext OUT --dtype D --report R --json` for every D in `--dtypes`:
             wall time, peak RSS, exit status (1 is a legitimate verdict on random weights; >= 2 or a signal is a
             failed run) and the JSON it prints (its `timing` section is kept as is)

A baseline whose float32 weights exceed 60 % of this machine's RAM is not run (32-layer 8B: 32 GB); its load
and forward times are EXTRAPOLATED linearly in the number of layers (a + b * layers, least squares) from the
baselines measured on the same model at other layer counts, and marked `*` / "extrapolated" everywhere.
Ratios: verify wall / baseline forward, and verify wall / baseline load + forward.

Targets (reported met / missed, never the exit status):
  - float32 peak RSS of the 32-layer 8B-dimension model within 15 % of the 2-layer one's, and under 4 GB
  - the MoE model's float32 peak RSS under the same 4 GB bound
  - verify wall of the 8B-dimension model at most 3x the plain forward

  python bench/verify_bench.py --out /tmp/vbench --json vb.json --markdown vb.md --plot vb.png   # the full sweep
  python bench/verify_bench.py --llama-layers 2 --moe-layers 0 --dtypes float32                  # a quick check
  python bench/verify_bench.py --dry-run                                                         # plan, disk, RAM

Models go under --out (OUT/<model>-L<layers>/{hf,maxtext}, reused on a re-run when their completion markers
are there) and are deleted once measured unless --keep; the verify reports stay in OUT/reports. Exit status:
0 every run completed, 1 some run failed (verify >= 2, a crash, a failed conversion), 2 not enough disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil
from measure import Run, dir_bytes, pyplot, run_measured, synthetic_model, synthetic_params

LLAMA, MOE = "llama3.1-8b", "qwen3-30b-a3b"
DISK_MARGIN = 5e9  # free bytes left after building a model and its conversion
BASELINE_RAM_FRACTION = 0.6  # run the float32 baseline only when its weights take at most this share of RAM
TARGET_PEAK_GB = 4.0
TARGET_PEAK_GROWTH = 1.15  # largest-layer peak / smallest-layer peak
TARGET_X_FORWARD = 3.0  # verify wall / plain forward
EXTRAPOLATED = "*"


class DiskSpaceError(Exception):
    pass


@dataclass(frozen=True)
class Case:
    model: str
    layers: int

    @property
    def tag(self) -> str:
        return f"{self.model}-L{self.layers}"

    @property
    def params(self) -> int:
        return synthetic_params(self.model, self.layers)

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.params

    @property
    def f32_bytes(self) -> int:
        return 4 * self.params


def ram_bytes() -> int:
    return psutil.virtual_memory().total


def baseline_fits(case: Case, ram: int) -> bool:
    return case.f32_bytes <= BASELINE_RAM_FRACTION * ram


# ---- the plain forward pass (run in its own process: `verify_bench.py --baseline-worker HF`) -------------------


def baseline_worker(hf: Path) -> int:
    """Load the HF model in float32, run every verify prompt once; print {load_s, forward_s, ...} as JSON."""
    import torch
    from transformers import AutoModelForCausalLM

    from converters.verify.prompts import build_prompts

    cfg = json.loads((hf / "config.json").read_text())
    vocab = cfg.get("vocab_size") or cfg.get("text_config", {})["vocab_size"]
    prompts = build_prompts(tokenizer=None, vocab_size=vocab, seed=0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32, attn_implementation="eager").eval()
    load_s = time.perf_counter() - t0
    per_prompt = []
    with torch.no_grad():
        for p in prompts:
            t = time.perf_counter()
            model(input_ids=torch.tensor([p.token_ids], dtype=torch.long), use_cache=False)
            per_prompt.append(round(time.perf_counter() - t, 3))
    print(
        json.dumps(
            {
                "load_s": round(load_s, 3),
                "forward_s": round(sum(per_prompt), 3),
                "forward_per_prompt_s": per_prompt,
                "prompt_tokens": [p.length for p in prompts],
                "torch_threads": torch.get_num_threads(),
            }
        )
    )
    return 0


def last_json(text: str | None) -> dict | None:
    """The JSON object a command printed on stdout (tolerating lines printed before it)."""
    if not text:
        return None
    dec = json.JSONDecoder()
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n" and text[i + 1 : i + 2] == "{"]
    for i in starts:
        try:
            obj, _ = dec.raw_decode(text.lstrip() if i == 0 else text, 0 if i == 0 else i)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def run_failed(returncode: int) -> bool:
    """verify: 0 passed, 1 KL above threshold (expected on random weights); >= 2 bad input, < 0 a signal (OOM)."""
    return returncode >= 2 or returncode < 0


def round_record(r: Run) -> dict:
    return {
        "exit": r.returncode,
        "failed": run_failed(r.returncode),
        "wall_s": r.wall_s,
        "peak_rss_GB": r.peak_rss_GB,
        "others_cpu_share": r.others_cpu_share,
    }


def run_baseline(hf: Path, cold: bool) -> dict:
    r = run_measured(
        [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", str(hf)], cold=cold, capture_stdout=True
    )
    rec = round_record(r)
    rec["failed"] = r.returncode != 0
    out = last_json(r.stdout)
    if out is None or rec["failed"]:
        rec["failed"], rec["error"] = True, r.stderr[-2000:]
    else:
        rec.update(out)
    return rec


def run_verify(hf: Path, mt: Path, dtype: str, report: Path, cold: bool) -> dict:
    shutil.rmtree(report, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "converters",
        "verify",
        "--hf",
        str(hf),
        "--maxtext",
        str(mt),
        "--dtype",
        dtype,
        "--report",
        str(report),
        "--json",
    ]
    r = run_measured(cmd, cold=cold, capture_stdout=True)
    report.mkdir(parents=True, exist_ok=True)
    (report / "bench-stdout.txt").write_text(r.stdout or "")
    (report / "bench-stderr.log").write_text(r.stderr)
    rec = round_record(r)
    out = last_json(r.stdout)
    rec.update(report=str(report), timing=(out or {}).get("timing"), verify_json=out)
    if out is not None:
        rec["passed"] = out.get("passed")
        rec["kl_max"] = out.get("summary", {}).get("kl_max")
    if rec["failed"]:
        rec["error"] = r.stderr[-2000:]
    return rec


def combine_rounds(rounds: list[dict], keys: tuple[str, ...] = ()) -> dict:
    """Median wall (and median of `keys`) over the rounds that did not fail; the highest peak RSS of them all."""
    ok = [r for r in rounds if not r["failed"]]
    out = {
        "rounds": rounds,
        "failed_rounds": len(rounds) - len(ok),
        "exit": sorted({r["exit"] for r in rounds}),
        "peak_rss_GB": max((r["peak_rss_GB"] for r in rounds), default=None),
        "wall_s": None,
    }
    if ok:
        walls = sorted(r["wall_s"] for r in ok)
        out.update(wall_s=round(statistics.median(walls), 2), wall_min_s=walls[0], wall_max_s=walls[-1])
        for k in keys:
            out[k] = round(statistics.median(r[k] for r in ok), 3)
        mid = min(ok, key=lambda r: abs(r["wall_s"] - out["wall_s"]))  # the round closest to the median
        for k in ("timing", "passed", "kl_max"):
            if k in mid:
                out[k] = mid[k]
    return out


# ---- models on disk -------------------------------------------------------------------------------------------


def marker(folder: Path) -> Path:
    return folder.with_name(folder.name + ".complete")


def is_complete(folder: Path, case: Case) -> bool:
    m = marker(folder)
    return folder.exists() and m.exists() and json.loads(m.read_text()) == {"model": case.model, "layers": case.layers}


def mark_complete(folder: Path, case: Case) -> None:
    marker(folder).write_text(json.dumps({"model": case.model, "layers": case.layers}) + "\n")


def disk_needed(case: Case, hf: Path, mt: Path) -> int:
    """Bytes still to write for `case`: its bf16 safetensors and their bf16 MaxText conversion, about as large."""
    return (0 if is_complete(hf, case) else case.bf16_bytes) + (0 if is_complete(mt, case) else case.bf16_bytes)


def check_disk(case: Case, work: Path, hf: Path, mt: Path) -> None:
    need = disk_needed(case, hf, mt)
    free = shutil.disk_usage(work).free
    if need and free < need + DISK_MARGIN:
        raise DiskSpaceError(
            f"not enough disk under {work} for {case.tag}: it needs {need / 1e9:.1f} GB (HF safetensors + "
            f"MaxText conversion) plus a {DISK_MARGIN / 1e9:.0f} GB margin, and {free / 1e9:.1f} GB are free"
        )


def prepare(case: Case, hf: Path, mt: Path) -> dict:
    """The synthetic HF model and its scanned bf16 MaxText conversion, each reused when already complete."""
    info: dict = {}
    if not is_complete(hf, case):
        shutil.rmtree(hf, ignore_errors=True)
        t = time.monotonic()
        synthetic_model(case.model, case.layers, hf)
        mark_complete(hf, case)
        info["build_s"] = round(time.monotonic() - t, 1)
    if not is_complete(mt, case):
        shutil.rmtree(mt, ignore_errors=True)
        progress(f"[{case.tag}] converting to a scanned MaxText checkpoint in {mt} ...")
        r = run_measured(
            [sys.executable, "-m", "converters", "convert", str(hf), str(mt), "--to", "maxtext", "--scan", "-q"],
            cold=False,
        )
        info["convert"] = {"exit": r.returncode, "wall_s": r.wall_s, "peak_rss_GB": r.peak_rss_GB}
        if r.returncode:
            raise RuntimeError(f"conversion of {hf} failed ({r.returncode}):\n{r.stderr[-2000:]}")
        mark_complete(mt, case)
    info["hf_GB"] = round(dir_bytes(hf) / 1e9, 3)
    info["maxtext_GB"] = round(dir_bytes(mt) / 1e9, 3)
    return info


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure_case(case: Case, work: Path, dtypes: list[str], rounds: int, cold: bool, keep: bool, ram: int) -> dict:
    """Build and convert `case` (or reuse them), measure it, then delete its folders unless `keep`."""
    folder = work / case.tag
    res = {
        "model": case.model,
        "layers": case.layers,
        "params_B": round(case.params / 1e9, 3),
        "f32_weights_GB": round(case.f32_bytes / 1e9, 2),
    }
    check_disk(case, work, folder / "hf", folder / "maxtext")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        res.update(prepare(case, folder / "hf", folder / "maxtext"))
        res.update(measure_rounds(case, folder, work / "reports" / case.tag, dtypes, rounds, cold, ram))
    except RuntimeError as e:
        progress(f"[{case.tag}] {e}")
        res["error"] = str(e)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return res


def measure_rounds(
    case: Case, folder: Path, reports: Path, dtypes: list[str], rounds: int, cold: bool, ram: int
) -> dict:
    """Every round: the baseline (when it fits in RAM), then verify in every dtype; combined over the rounds."""
    hf, mt = folder / "hf", folder / "maxtext"
    res: dict = {}
    fits = baseline_fits(case, ram)
    base_rounds: list[dict] = []
    verify_rounds: dict[str, list[dict]] = {d: [] for d in dtypes}
    for k in range(1, rounds + 1):
        if fits:
            progress(f"[{case.tag}] round {k}/{rounds}: baseline (transformers float32 load + forward) ...")
            base_rounds.append(run_baseline(hf, cold))
            b = base_rounds[-1]
            progress(
                f"[{case.tag}]   baseline: "
                + (
                    f"FAILED (exit {b['exit']})"
                    if b["failed"]
                    else f"load {b['load_s']:.1f} s, forward {b['forward_s']:.1f} s, peak {b['peak_rss_GB']:.2f} GB"
                )
            )
        for d in dtypes:
            progress(f"[{case.tag}] round {k}/{rounds}: ckptflow verify --dtype {d} ...")
            v = run_verify(hf, mt, d, reports / f"{d}-r{k}", cold)
            verify_rounds[d].append(v)
            progress(
                f"[{case.tag}]   verify {d}: exit {v['exit']}{' (FAILED RUN)' if v['failed'] else ''}, "
                f"{v['wall_s']:.1f} s, peak {v['peak_rss_GB']:.2f} GB"
            )
    if fits:  # status: what happened; source (set by fill_baselines): where the numbers come from
        res["baseline"] = combine_rounds(base_rounds, ("load_s", "forward_s"))
        res["baseline"]["status"] = "measured" if res["baseline"]["wall_s"] is not None else "failed"
    else:
        res["baseline"] = {
            "status": "skipped",
            "reason": f"float32 weights {case.f32_bytes / 1e9:.1f} GB > "
            f"{BASELINE_RAM_FRACTION:.0%} of {ram / 2**30:.1f} GiB RAM",
        }
    res["verify"] = {d: combine_rounds(r) for d, r in verify_rounds.items()}
    return res


# ---- extrapolation, ratios, targets (pure functions of the results) -------------------------------------------


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(a, b) of y = a + b * x by least squares; needs at least two distinct x."""
    xs, ys = zip(*points) if points else ((), ())
    if len(set(xs)) < 2:
        raise ValueError(f"a line needs points at two distinct layer counts, got {sorted(set(xs))}")
    b, a = statistics.linear_regression(xs, ys)
    return a, b


def fill_baselines(results: list[dict]) -> None:
    """Baselines not measured (too large, or failed) get load and forward times extrapolated from the same model's
    measured layer counts (source "extrapolated", else "unavailable"); then every verify row gets its ratios to the
    baseline. Idempotent: run again as results come in."""
    for res in results:
        base = res.get("baseline")
        if base is None:
            continue
        if base["status"] == "measured":
            base["source"] = "measured"
            continue
        measured = [
            r for r in results if r["model"] == res["model"] and r.get("baseline", {}).get("status") == "measured"
        ]
        try:
            fits = {k: fit_line([(r["layers"], r["baseline"][k]) for r in measured]) for k in ("load_s", "forward_s")}
        except ValueError as e:
            base.update(source="unavailable", extrapolation_error=str(e))
            continue
        base.pop("extrapolation_error", None)
        for k, (a, b) in fits.items():
            base[k] = round(a + b * res["layers"], 3)
        base["source"] = "extrapolated"
        base["fit"] = {
            "from_layers": sorted(r["layers"] for r in measured),
            **{k: {"a": round(a, 4), "b_per_layer": round(b, 4)} for k, (a, b) in fits.items()},
        }
    for res in results:
        base = res.get("baseline", {})
        for v in res.get("verify", {}).values():
            fwd, load = base.get("forward_s"), base.get("load_s")
            v["baseline_source"] = base.get("source")
            v["x_forward"] = round(v["wall_s"] / fwd, 2) if v["wall_s"] and fwd else None
            v["x_load_forward"] = (
                round(v["wall_s"] / (fwd + load), 2) if v["wall_s"] and fwd and load is not None else None
            )


def rows_of(results: list[dict], model: str, dtype: str, ok_only: bool = True) -> list[dict]:
    """(layers, verify row, baseline) of `model` in `dtype`, by layer count; without `ok_only`, failed runs too."""
    return sorted(
        (
            {"layers": r["layers"], **r["verify"][dtype], "baseline": r["baseline"]}
            for r in results
            if r["model"] == model and dtype in r.get("verify", {}) and (r["verify"][dtype]["wall_s"] or not ok_only)
        ),
        key=lambda r: r["layers"],
    )


def target(text: str, value: str, met: bool | None, note: str = "") -> dict:
    return {"target": text, "value": value, "met": met, **({"note": note} if note else {})}


def failed_run(row: dict) -> dict | None:
    """A target on a run that failed is missed, whatever it measured before it died."""
    if row["wall_s"]:
        return None
    return {
        "value": f"the run failed (exit {'/'.join(map(str, row['exit']))}; peak seen {row['peak_rss_GB']:.2f} GB)",
        "met": False,
    }


def peak_targets(results: list[dict]) -> list[dict]:
    out = []
    llama = rows_of(results, LLAMA, "float32", ok_only=False)
    if llama:
        lo, hi = llama[0], llama[-1]
        note = (
            "" if (lo["layers"], hi["layers"]) == (2, 32) else "stated for 32 vs 2 layers; these layer counts were run"
        )
        if hi["layers"] > lo["layers"]:
            text = (
                f"{LLAMA} float32 peak RSS at {hi['layers']} layers "
                f"<= {TARGET_PEAK_GROWTH:.2f} x at {lo['layers']} layers"
            )
            g = hi["peak_rss_GB"] / lo["peak_rss_GB"]
            out.append(
                {
                    **target(
                        text,
                        f"{hi['peak_rss_GB']:.2f} / {lo['peak_rss_GB']:.2f} GB = {g:.2f}x",
                        g <= TARGET_PEAK_GROWTH,
                        note,
                    ),
                    **(failed_run(hi) or failed_run(lo) or {}),
                }
            )
        out.append(
            {
                **target(
                    f"{LLAMA} float32 peak RSS at {hi['layers']} layers < {TARGET_PEAK_GB:g} GB",
                    f"{hi['peak_rss_GB']:.2f} GB",
                    hi["peak_rss_GB"] < TARGET_PEAK_GB,
                    note if hi["layers"] != 32 else "",
                ),
                **(failed_run(hi) or {}),
            }
        )
    for m in rows_of(results, MOE, "float32", ok_only=False)[-1:]:
        out.append(
            {
                **target(
                    f"{MOE} ({m['layers']} layers) float32 peak RSS < {TARGET_PEAK_GB:g} GB",
                    f"{m['peak_rss_GB']:.2f} GB",
                    m["peak_rss_GB"] < TARGET_PEAK_GB,
                ),
                **(failed_run(m) or {}),
            }
        )
    return out


def evaluate_targets(results: list[dict]) -> list[dict]:
    out = peak_targets(results)
    for dtype in dict.fromkeys(d for r in results for d in r.get("verify", {})):  # in the order run
        for r in rows_of(results, LLAMA, dtype, ok_only=False)[-1:]:
            x = r.get("x_forward")
            text = f"{LLAMA} ({r['layers']} layers) verify {dtype} wall <= {TARGET_X_FORWARD:g} x plain float32 forward"
            value = f"{r['wall_s']:.1f} s = {x:.2f}x forward" if x else "no baseline forward to compare with"
            note = "baseline forward EXTRAPOLATED" if r["baseline_source"] == "extrapolated" else ""
            out.append({**target(text, value, x <= TARGET_X_FORWARD if x else None, note), **(failed_run(r) or {})})
    return out


# ---- output -----------------------------------------------------------------------------------------------------

COLUMNS = (
    "model dims",
    "layers",
    "dtype",
    "verify wall s",
    "range s",
    "peak RSS GB",
    "exit",
    "KL max",
    "base load s",
    "base fwd s",
    "base peak GB",
    "x fwd",
    "x load+fwd",
)


def _num(x, fmt: str, star: bool = False) -> str:
    return "n/a" if x is None else format(x, fmt) + (EXTRAPOLATED if star else "")


def table_cells(results: list[dict]) -> list[tuple[str, ...]]:
    rows = []
    for res in results:
        base = res.get("baseline", {})
        ext = base.get("source") == "extrapolated"
        if "error" in res:
            rows.append((res["model"], str(res["layers"]), "-", "conversion failed") + ("",) * (len(COLUMNS) - 4))
        for d, v in res.get("verify", {}).items():
            exits = "/".join(map(str, v["exit"])) + (" FAILED" if v["failed_rounds"] else "")
            spread = f"{v['wall_min_s']:.1f}-{v['wall_max_s']:.1f}" if v["wall_s"] else "n/a"
            rows.append(
                (
                    res["model"],
                    str(res["layers"]),
                    d,
                    _num(v["wall_s"], ".1f"),
                    spread,
                    _num(v["peak_rss_GB"], ".2f"),
                    exits,
                    _num(v.get("kl_max"), ".2e"),
                    _num(base.get("load_s"), ".1f", ext),
                    _num(base.get("forward_s"), ".1f", ext),
                    _num(base.get("peak_rss_GB"), ".2f"),
                    _num(v.get("x_forward"), ".2f", ext),
                    _num(v.get("x_load_forward"), ".2f", ext),
                )
            )
    return rows


BUSY_MACHINE = 0.1  # other processes' share of the CPUs during a run above which its time is flagged


def busy_runs(results: list[dict]) -> list[str]:
    """Runs during which other processes used a noticeable share of the CPUs: their wall times are inflated."""
    runs = [
        (f"{res['model']} x {res['layers']} {name} round {k}", r.get("others_cpu_share", 0.0))
        for res in results
        for name, row in [("baseline", res.get("baseline", {})), *res.get("verify", {}).items()]
        for k, r in enumerate(row.get("rounds", []), 1)
    ]
    return [f"{name} {share:.0%}" for name, share in runs if share > BUSY_MACHINE]


def legend(results: list[dict]) -> list[str]:
    lines = [
        "baseline: one plain transformers float32 forward of the verify prompts (load and forward timed apart); "
        "x fwd = verify wall / baseline forward, x load+fwd = verify wall / (load + forward)"
    ]
    busy = busy_runs(results)
    if busy:
        lines.append(
            f"WARNING: other processes used more than {BUSY_MACHINE:.0%} of the CPUs during: {', '.join(busy)} "
            "(their times are inflated; rerun on an idle machine or with --rounds)"
        )
    for res in results:
        base = res.get("baseline", {})
        if base.get("source") == "extrapolated":
            lines.append(
                f"{EXTRAPOLATED} EXTRAPOLATED for {res['model']} x {res['layers']} layers "
                f"({base.get('reason', 'its baseline run failed')}): "
                f"linear fit in layers of the measured {', '.join(map(str, base['fit']['from_layers']))}-layer "
                f"baselines"
            )
        elif base.get("source") == "unavailable":
            why = base.get("reason", "its baseline run failed")
            lines.append(
                f"{res['model']} x {res['layers']} layers: no baseline ({why}; no extrapolation: "
                f"{base['extrapolation_error']})"
            )
    return lines


def timing_lines(results: list[dict]) -> list[str]:
    """verify's own `timing` section (whatever keys it has), flattened to name=seconds."""

    def flat(d: dict, prefix: str = "") -> list[str]:
        parts = []
        for k, x in d.items():
            if isinstance(x, dict):
                parts += flat(x, f"{prefix}{k}.")
            elif isinstance(x, list) and all(isinstance(i, (int, float)) for i in x):
                parts.append(f"{prefix}{k}=[{', '.join(f'{i:g}' for i in x)}]")
            else:
                parts.append(f"{prefix}{k}={x:g}" if isinstance(x, (int, float)) else f"{prefix}{k}={x}")
        return parts

    return [
        f"{res['model']} x {res['layers']} {d}: " + ", ".join(flat(v["timing"]))
        for res in results
        for d, v in res.get("verify", {}).items()
        if v.get("timing")
    ]


def target_lines(targets: list[dict]) -> list[str]:
    verdict = {True: "met", False: "MISSED", None: "n/a"}
    return [
        f"[{verdict[t['met']]}] {t['target']}: {t['value']}" + (f" ({t['note']})" if t.get("note") else "")
        for t in targets
    ]


def print_report(results: list[dict], targets: list[dict]) -> None:
    cells = [COLUMNS] + table_cells(results)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    print()
    for r in cells:
        print("  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for block, lines in (
        ("", legend(results)),
        ("verify timing (s):", timing_lines(results)),
        ("targets:", target_lines(targets)),
    ):
        if lines:
            print(f"\n{block}" if block else "")
            print("\n".join(lines))


def markdown(results: list[dict], targets: list[dict]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(r) + " |" for r in table_cells(results)]
    out += [""] + [f"{line}  " for line in legend(results)]
    if timing_lines(results):
        out += ["", "verify's own timing (s):", ""] + [f"- {line}" for line in timing_lines(results)]
    out += ["", "Targets:", ""] + [f"- {line}" for line in target_lines(targets)]
    return "\n".join(out) + "\n"


def plot(results: list[dict], path: Path) -> None:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (mem, wall) = plt.subplots(1, 2, figsize=(12, 4.5))
    dtypes = sorted({d for r in results for d in r.get("verify", {})})
    for d, color in zip(dtypes, ("tab:blue", "tab:orange", "tab:green")):
        for model, style in ((LLAMA, "o-"), (MOE, "s")):
            rows = rows_of(results, model, d)
            if rows:
                xs = [r["layers"] for r in rows]
                mem.plot(xs, [r["peak_rss_GB"] for r in rows], style, color=color, label=f"verify {d} ({model} dims)")
                wall.plot(xs, [r["wall_s"] for r in rows], style, color=color, label=f"verify {d} ({model} dims)")
    for model, style in ((LLAMA, "^"), (MOE, "v")):
        res = sorted(
            (r for r in results if r["model"] == model and r.get("baseline", {}).get("forward_s") is not None),
            key=lambda r: r["layers"],
        )
        if not res:
            continue
        xs = [r["layers"] for r in res]
        wall.plot(xs, [r["baseline"]["forward_s"] for r in res], ":", color="gray")
        wall.plot(
            xs,
            [TARGET_X_FORWARD * r["baseline"]["forward_s"] for r in res],
            ":_",
            color="red",
            label=f"target: {TARGET_X_FORWARD:g}x forward ({model} dims)",
        )
        for source, fill in (("measured", None), ("extrapolated", "none")):
            pts = [r for r in res if r["baseline"]["source"] == source]
            if pts:
                wall.plot(
                    [r["layers"] for r in pts],
                    [r["baseline"]["forward_s"] for r in pts],
                    style,
                    color="gray",
                    mfc=fill,
                    label=f"baseline float32 forward, {source.upper() if fill else source} ({model} dims)",
                )
                if not fill:
                    mem.plot(
                        [r["layers"] for r in pts],
                        [r["baseline"]["peak_rss_GB"] for r in pts],
                        style + "--",
                        color="gray",
                        label=f"baseline float32 load + forward ({model} dims)",
                    )
    mem.axhline(TARGET_PEAK_GB, color="red", ls=":", label=f"target: {TARGET_PEAK_GB:g} GB")
    mem.set(xlabel="decoder layers", ylabel="peak RSS of the process tree (GB)", title="ckptflow verify: peak memory")
    wall.set(xlabel="decoder layers", ylabel="wall time (s)", title="ckptflow verify: wall time vs one plain forward")
    for ax in (mem, wall):
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    repo = Path(__file__).resolve().parents[1]
    git = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "converters"], capture_output=True, text=True
    )
    return {
        "cpus": psutil.cpu_count(),
        "ram_GiB": round(ram_bytes() / 2**30, 1),
        "commit": git.stdout.strip() or None,
        "converters_modified": bool(dirty.stdout.strip()),
        **{p: version(p) for p in ("torch", "transformers", "jax")},
    }


def write_outputs(a: argparse.Namespace, results: list[dict], env: dict) -> list[dict]:
    fill_baselines(results)
    targets = evaluate_targets(results)
    if a.json:
        a.json.write_text(json.dumps({"environment": env, "results": results, "targets": targets}, indent=2) + "\n")
    if a.markdown:
        a.markdown.write_text(markdown(results, targets))
    if a.plot and any(r.get("verify") for r in results):
        plot(results, a.plot)
    return targets


def plan(cases: list[Case], work: Path, ram: int) -> None:
    """--dry-run: what would be built, measured, skipped and extrapolated, and the disk it needs."""
    free = shutil.disk_usage(work if work.exists() else work.parent).free
    print(
        f"RAM {ram / 2**30:.1f} GiB (baseline limit: float32 weights <= {BASELINE_RAM_FRACTION * ram / 1e9:.1f} GB); "
        f"free disk under {work}: {free / 1e9:.1f} GB"
    )
    for c in cases:
        hf, mt = work / c.tag / "hf", work / c.tag / "maxtext"
        if baseline_fits(c, ram):
            base = "measured"
        else:
            meas = sorted(x.layers for x in cases if x.model == c.model and baseline_fits(x, ram))
            base = (
                f"skipped, EXTRAPOLATED from {', '.join(map(str, meas))} layers"
                if len(set(meas)) >= 2
                else "skipped, cannot be extrapolated (fewer than two measured layer counts of this model)"
            )
        need = disk_needed(c, hf, mt)
        print(
            f"{c.tag}: {c.params / 1e9:.2f} B params, {c.bf16_bytes / 1e9:.1f} GB bf16 on disk (x2 with its "
            f"conversion), "
            f"float32 {c.f32_bytes / 1e9:.1f} GB; baseline {base}; still to write {need / 1e9:.1f} GB"
            f"{'' if not need or free >= need + DISK_MARGIN else '  << NOT ENOUGH DISK'}"
        )


def layer_list(s: str) -> list[int]:
    return [n for n in (int(x) for x in s.split(",") if x.strip()) if n > 0]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--baseline-worker":
        return baseline_worker(Path(sys.argv[2]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--llama-layers",
        type=layer_list,
        default=[2, 8, 32],
        metavar="N,N,...",
        help=f"layer counts of the {LLAMA}-dimension models (default 2,8,32; empty or 0 to skip)",
    )
    p.add_argument(
        "--moe-layers",
        type=int,
        default=4,
        metavar="N",
        help=f"layers of the {MOE}-dimension model (default 4; 0 skips it)",
    )
    p.add_argument(
        "--dtypes", default="float32,bfloat16", help="`verify --dtype` values to measure (default float32,bfloat16)"
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="rounds of every run; walls are medians, peaks the highest (default 1)"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/ckptflow-verify-bench"),
        help="models (reused when complete) and verify reports (default /tmp/ckptflow-verify-bench)",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep each model's HF and MaxText folders after its measurements"
    )
    p.add_argument("--warm", action="store_true", help="do not drop the page cache before each run")
    p.add_argument("--json", type=Path, metavar="FILE", help="results, rounds, verify's JSON and targets as JSON")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="the table, legend and targets as Markdown")
    p.add_argument("--plot", type=Path, metavar="FILE", help="PNG: peak RSS and wall time against layers, per dtype")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (sizes, disk, baselines measured or extrapolated) and exit",
    )
    a = p.parse_args()
    dtypes = [d for d in a.dtypes.split(",") if d]
    if not dtypes or set(dtypes) - {"float32", "bfloat16"}:
        p.error(f"--dtypes: float32 and/or bfloat16, got {a.dtypes!r}")
    cases = [Case(LLAMA, n) for n in a.llama_layers] + ([Case(MOE, a.moe_layers)] if a.moe_layers > 0 else [])
    ram = ram_bytes()
    if a.dry_run:
        plan(cases, a.out, ram)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    results: list[dict] = []
    try:
        for c in cases:
            results.append(measure_case(c, a.out, dtypes, max(1, a.rounds), not a.warm, a.keep, ram))
            write_outputs(a, results, env)
    except DiskSpaceError as e:
        targets = write_outputs(a, results, env)
        if results:
            print_report(results, targets)
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    targets = write_outputs(a, results, env)
    print_report(results, targets)
    failed = any(
        "error" in r
        or r.get("baseline", {}).get("failed_rounds")
        or any(v["failed_rounds"] for v in r["verify"].values())
        for r in results
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

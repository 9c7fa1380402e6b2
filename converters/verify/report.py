"""Report files: verify.json (all metrics), verify.md (tables), kl_per_token.png (KL along each prompt)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

KL_FLOOR = 1e-12  # plotted instead of 0 / tiny negatives (log scale)


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    return f"{x:.3e}"


def _cell(s) -> str:
    """A token's text made safe for a markdown table cell (empty when there is no tokenizer)."""
    if s is None:
        return ""
    s = str(s)
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f"`{s}`" if s.strip() else repr(s)


def write_json(result: dict, out_dir: Path) -> Path:
    p = out_dir / "verify.json"
    p.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    return p


def _verdict_lines(result: dict) -> list[str]:
    v = result["verdict"]
    out = ["## Verdict", "", "| part | question | result | measure |", "|---|---|---|---|"]

    def status(part: dict) -> str:
        return "not run" if not part["ran"] else ("pass" if part["passed"] else "**FAIL**")

    c, lay, pre = v["content"], v["layout"], v["precision"]
    measure = (
        f"{c['bit_exact']} of {c['tensors']} tensors bit-exact, {c['within_bound']} within the format's bound, "
        f"{c['failed']} outside"
        if c["ran"]
        else c.get("why", "")
    )
    out.append(f"| content | does the checkpoint hold this source's weights? | {status(c)} | {measure} |")
    measure = (
        f"max KL {_fmt(lay['kl_max'])} (threshold {lay['max_kl']:g}, float32)" if lay["ran"] else lay.get("why", "")
    )
    out.append(f"| layout | does MaxText compute the source model from it? | {status(lay)} | {measure} |")
    out.append(
        f"| precision | what do the dtype and the format cost? | {status(pre)} | max KL {_fmt(pre['kl_max'])} "
        f"(threshold {pre['max_kl']:g}, {result['dtype']}) |"
    )
    out.append("")
    if c["ran"] and c["failures"]:
        out += [
            "### Tensors that differ from the source",
            "",
            "| tensor | elements outside the bound | max abs error | example |",
            "|---|---:|---:|---|",
        ]
        for f in c["failures"]:
            out.append(
                f"| `{f['tensor']}` | {f['elements_outside_bound']} | {f['max_abs_error']:.3g} | "
                f"{_cell(json.dumps(f['example']))} |"
            )
        if c["failed"] > len(c["failures"]):
            out.append(f"| ... {c['failed'] - len(c['failures'])} more | | | |")
        out.append("")
    if pre["explanation"]:
        out += ["### Where the precision goes", ""] + [f"- {line}" for line in pre["explanation"]] + [""]
    return out


def render_markdown(result: dict) -> str:
    s = result["summary"]
    ref_name = "HF" if result["reference"]["kind"] == "hf" else "Golden"
    status = "PASSED" if s["passed"] else "FAILED"
    lines = [
        f"# ckptflow verify: {status}",
        "",
        f"- MaxText checkpoint: `{result['maxtext']['path']}` ({result['maxtext']['layout']}, "
        f"model_type `{result['maxtext']['model_type']}`, stored as {result['maxtext'].get('dtype', '?')})",
        f"- Reference: {ref_name} `{result['reference']['path']}`",
        f"- dtype: {result['dtype']}; {s['num_tokens']} tokens in {s['num_prompts']} prompts",
        "",
    ]
    for w in result.get("warnings", []):
        lines.append(f"> warning: {w}")
    if result.get("warnings"):
        lines.append("")
    lines += _verdict_lines(result)

    lines += [
        "## Comparisons",
        "",
        "| comparison | what | max KL | mean KL | max abs logit diff | top-1 agreement |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, c in result["comparisons"].items():
        cs = c["summary"]
        lines.append(
            f"| {name} | {c['description']} | {_fmt(cs['kl_max'])} | {_fmt(cs['kl_mean'])} | "
            f"{_fmt(cs['max_abs_logit_diff'])} "
            f"| {100 * cs['top1_agreement']:.1f}% |"
        )
    lines.append("")

    lines += [
        f"## Precision per prompt ({result['comparisons']['precision']['description']})",
        "",
        "| prompt | tokens | mean KL | max KL (position) | max abs logit diff | top-10 overlap | Jaccard | rank "
        "agreement | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in result["prompts"]:
        lines.append(
            f"| {_cell(p['label'])} | {p['num_tokens']} | {_fmt(p['kl_mean'])} | {_fmt(p['kl_max'])} "
            f"({p['kl_argmax']}) "
            f"| {_fmt(p['max_abs_logit_diff'])} | {p['top10_overlap']}/10 | {p['top10_jaccard']:.3f} "
            f"| {100 * p['top10_rank_agreement']:.0f}% | {'pass' if p['passed'] else '**FAIL**'} |"
        )
    lines.append("")

    for p in result["prompts"]:
        lines += [f"## Top-10 at the last position: {_cell(p['label'])}", ""]
        lines += [
            f"| rank | {ref_name} id | {ref_name} token | {ref_name} logit | MaxText id | MaxText token | MaxText "
            f"logit |",
            "|---:|---:|---|---:|---:|---|---:|",
        ]
        for r, (a, b) in enumerate(zip(p["top10_ref"], p["top10_maxtext"]), 1):
            mark = "" if a["id"] == b["id"] else " ≠"
            lines.append(
                f"| {r}{mark} | {a['id']} | {_cell(a.get('token'))} | {a['logit']:.4f} "
                f"| {b['id']} | {_cell(b.get('token'))} | {b['logit']:.4f} |"
            )
        lines.append("")
    timing = result.get("timing") or {}
    if timing:
        lines += ["## Where the time went (wall seconds)", "", "| activity | s |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in timing.items()] + [""]
    return "\n".join(lines)


def write_markdown(result: dict, out_dir: Path) -> Path:
    p = out_dir / "verify.md"
    p.write_text(render_markdown(result))
    return p


def write_plot(result: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    threshold = result["summary"]["max_kl_threshold"]
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    for p in result["prompts"]:
        kl = [max(float(k), KL_FLOOR) if not math.isnan(k) else float("nan") for k in p["kl_per_token"]]
        style = {"marker": "o", "markersize": 4} if len(kl) <= 16 else {"linewidth": 1}
        text = f" {p['text'][:24]!r}" if p.get("text") else ""
        ax.plot(range(len(kl)), kl, label=f"{p['name']}{text} ({len(kl)} tokens)", **style)
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"precision threshold {threshold:g}")
    layout = result.get("verdict", {}).get("layout", {})
    if layout.get("ran"):
        ax.axhline(
            layout["max_kl"],
            color="purple",
            linestyle=":",
            linewidth=1,
            label=f"layout: max KL {layout['kl_max']:.2g} (threshold {layout['max_kl']:g})",
        )
    ax.set_yscale("log")
    ax.set_xlabel("position")
    ax.set_ylabel(f"KL(P_ref || Q_maxtext)  (floor {KL_FLOOR:g})")
    status = "passed" if result["summary"]["passed"] else "FAILED"
    ax.set_title(f"Per-token KL, {result['dtype']} ({status})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    p = out_dir / "kl_per_token.png"
    fig.savefig(p)
    plt.close(fig)
    return p


def write_report(result: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "json": write_json(result, out),
        "markdown": write_markdown(result, out),
        "plot": write_plot(result, out),
    }

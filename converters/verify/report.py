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


def render_markdown(result: dict) -> str:
    s = result["summary"]
    ref_name = "HF" if result["reference"]["kind"] == "hf" else "Golden"
    status = "PASSED" if s["passed"] else "FAILED"
    lines = [
        f"# ckptflow verify: {status}",
        "",
        f"- MaxText checkpoint: `{result['maxtext']['path']}` ({result['maxtext']['layout']}, "
        f"model_type `{result['maxtext']['model_type']}`)",
        f"- Reference: {ref_name} `{result['reference']['path']}`",
        f"- dtype: {result['dtype']}; threshold: max per-token KL <= {s['max_kl_threshold']}",
        f"- Overall: mean KL {_fmt(s['kl_mean'])}, max KL {_fmt(s['kl_max'])} (prompt `{s['kl_max_prompt']}`), "
        f"max |Δlogit| {_fmt(s['max_abs_logit_diff'])}, {s['num_tokens']} tokens in {s['num_prompts']} prompts",
        "",
    ]
    for w in result.get("warnings", []):
        lines.append(f"> warning: {w}")
    if result.get("warnings"):
        lines.append("")

    lines += [
        "## Metrics",
        "",
        "| prompt | tokens | mean KL | max KL (position) | max abs logit diff | top-10 overlap | Jaccard | rank agreement | result |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in result["prompts"]:
        lines.append(
            f"| {_cell(p['label'])} | {p['num_tokens']} | {_fmt(p['kl_mean'])} | {_fmt(p['kl_max'])} ({p['kl_argmax']}) "
            f"| {_fmt(p['max_abs_logit_diff'])} | {p['top10_overlap']}/10 | {p['top10_jaccard']:.3f} "
            f"| {100 * p['top10_rank_agreement']:.0f}% | {'pass' if p['passed'] else '**FAIL**'} |"
        )
    lines.append("")

    for p in result["prompts"]:
        lines += [f"## Top-10 at the last position: {_cell(p['label'])}", ""]
        lines += [
            f"| rank | {ref_name} id | {ref_name} token | {ref_name} logit | MaxText id | MaxText token | MaxText logit |",
            "|---:|---:|---|---:|---:|---|---:|",
        ]
        for r, (a, b) in enumerate(zip(p["top10_ref"], p["top10_maxtext"]), 1):
            mark = "" if a["id"] == b["id"] else " ≠"
            lines.append(
                f"| {r}{mark} | {a['id']} | {_cell(a.get('token'))} | {a['logit']:.4f} "
                f"| {b['id']} | {_cell(b.get('token'))} | {b['logit']:.4f} |"
            )
        lines.append("")
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
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
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

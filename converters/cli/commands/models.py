import argparse
import json

from converters.core import registry

HELP = "list supported MaxText model names, their families and directions"


def add_parser(sub):
    p = sub.add_parser(
        "models",
        help=HELP,
        description=HELP + ".\n\nAny other size of a listed architecture converts too: "
        "its dimensions are read from the HF config.json.\n\nexample:\n  ckptflow models --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    return p


def run(args) -> int:
    rows = registry.table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    wm = max(len(r["model"]) for r in rows) + 2
    wf = max(len(r["family"]) for r in rows) + 2
    wa = max(len(r["architecture"]) for r in rows) + 2
    print(f"{'model':<{wm}}{'family':<{wf}}{'HF architecture':<{wa}}directions")
    for r in rows:
        layouts = "scanned and unscanned" if any("(scanned)" in d for d in r["directions"]) else "unscanned only"
        print(f"{r['model']:<{wm}}{r['family']:<{wf}}{r['architecture']:<{wa}}HF->MaxText and MaxText->HF, {layouts}")
    print(f"\nfamilies: {', '.join(registry.FAMILIES)} (other sizes of these architectures are read from config.json)")
    return 0

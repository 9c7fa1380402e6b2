import argparse
import json

from converters import registry

HELP = "list supported MaxText model names, their families and directions"


def add_parser(sub):
    p = sub.add_parser("models", help=HELP, description=HELP + ".\n\nAny other size of a listed architecture converts too: "
                       "its dimensions are read from the HF config.json.\n\nexample:\n  ckptflow models --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    return p


def run(args) -> int:
    rows = registry.table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<16} {'family':<10} {'HF architecture':<20} directions")
    for r in rows:
        print(f"{r['model']:<16} {r['family']:<10} {r['architecture']:<20} HF->MaxText and MaxText->HF, scanned and unscanned")
    print(f"\nfamilies: {', '.join(registry.FAMILIES)} (other sizes of these architectures are read from config.json)")
    return 0

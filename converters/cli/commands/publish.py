"""`ckptflow publish SRC DEST [--force]`: publish a converted checkpoint to file://, gs:// or hf://, atomically.

SRC must still match its lineage manifest (`ckptflow-manifest.json`: size and BLAKE3 of every file); a changed,
missing or extra file refuses the publish. DEST:

  file:///abs/path       copied to a temporary sibling and renamed into place
  gs://bucket/prefix     uploaded under a staging prefix (resumable, parallel), copied into place, and the
                         marker `ckptflow-published.json` written last: a reader never sees half a version
  hf://org/repo          repo created if needed (private unless --public); all files and a model card with
                         the lineage and verify metrics in ONE commit

The same content again is a no-op that succeeds ("unchanged"); a DEST holding a different version is refused
unless --force. `--verify-report verify.json` records the verify metrics in the manifest first.
`--receipt PATH` writes a small JSON record (destination, digest, files, bytes, status) that later steps read.

The library is `converters.remote.publish` (with `converters.remote.gcs` and `converters.remote.hub`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from converters.io.files import write_json_atomic
from converters.remote.publish import publish


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "publish",
        help="publish a converted checkpoint to file://, gs:// or hf://, atomically and checked against its manifest",
        description=__doc__.split("\n\nThe library")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="folder to publish (a converted checkpoint with its ckptflow-manifest.json)")
    p.add_argument("dest", help="file:///abs/path, gs://bucket/prefix or hf://org/repo")
    p.add_argument("--force", action="store_true", help="replace a destination that holds a different version")
    p.add_argument("--public", action="store_true", help="hf://: create the repo public (default: private)")
    p.add_argument(
        "--verify-report",
        default=None,
        metavar="FILE",
        help="verify.json whose metrics go into the manifest and model card",
    )
    p.add_argument("--workers", type=int, default=None, help="gs://: files uploaded at a time (default 8)")
    p.add_argument("--receipt", default=None, help="also write the receipt JSON to this file")
    p.add_argument("--json", action="store_true", help="print the receipt as JSON on stdout")
    return p


def run(args) -> int:
    receipt = publish(
        args.src,
        args.dest,
        force=args.force,
        public=args.public,
        verify_report=args.verify_report,
        workers=args.workers,
    )
    if args.receipt:
        write_json_atomic(Path(args.receipt), receipt)
    if args.json:
        print(json.dumps(receipt, sort_keys=True))
    else:
        print(
            f"{receipt['status']}: {receipt['destination']} ({receipt['files']} files, {receipt['bytes']} bytes, "
            f"{receipt['output_digest']})"
        )
    return 0

"""`ckptflow download SOURCE OUT [--revision REV]`: stage a model's files in a local folder, atomically.

SOURCE is a local folder or a Hugging Face repo id (`org/name`). Hub repos: the revision is resolved to a
commit sha first and exactly that commit is fetched, several files at a time; each file is checked against
the hub's sha256 (LFS weights) or git blob id (the rest), and a mismatch fails loudly. Only what a conversion
needs is taken (safetensors + index, config.json, generation_config.json, tokenizer and chat-template files);
pickled weights never. An interrupted download resumes: files already complete are kept and not fetched
again. OUT appears only complete, with `ckptflow-download.json` (source, commit sha, sha256 of every file).

A big hub download can be split over N processes or pods sharing OUT's folder: `--part I/N` (0-based) fetches
part I's run of the weight files (balanced by bytes) into the commit's staging folder beside OUT and records
them; `--finalize` then checks every part's files are there, fetches the small rest and publishes OUT as above.

The token comes from HF_TOKEN (the pipeline sets it from the Airflow connection `ckptflow_hf`) and is never
printed. `HF_ENDPOINT` points at a hub mirror.

The library is `converters.remote.download` (and `converters.remote.hub` for the hub side).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from converters.remote.download import download


def _part(text: str) -> tuple[int, int]:
    from converters.convert.shares import parse_share
    from converters.errors import CkptflowError

    try:
        return parse_share(text)
    except CkptflowError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "download",
        help="stage a model (local folder or hub repo at one commit) in a folder, safetensors only, verified, "
        "atomically",
        description="\n\n".join(__doc__.split("\n\n")[:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="local folder, file:// URI, or Hugging Face repo id (org/name)")
    p.add_argument("out", help="folder to create (replaced atomically when its content differs)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit (resolved to a commit sha)")
    p.add_argument(
        "--format", choices=("hf", "maxtext"), default="hf", dest="fmt", help="what SOURCE holds (default: hf)"
    )
    p.add_argument("--workers", type=int, default=None, help="hub files fetched at a time (default 8)")
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--part", metavar="I/N", type=_part, help="fetch only part I (0-based) of N of the weight files (hub repos)"
    )
    split.add_argument("--finalize", action="store_true", help="assemble OUT once every part has finished")
    p.add_argument("--json", action="store_true", help="print the download manifest as JSON on stdout")
    return p


def run(args) -> int:
    manifest, copied = download(
        args.source, args.out, args.revision, args.fmt, workers=args.workers, part=args.part, finalize=args.finalize
    )
    if args.json:
        print(json.dumps(manifest, sort_keys=True))
    elif args.part is not None:
        size = sum(f["size"] for f in manifest["files"].values())
        print(
            f"download part {args.part[0]}/{args.part[1]}: {len(manifest['files'])} weight files, {size} bytes "
            f"({'fetched' if copied else 'nothing to fetch'})"
        )
    else:
        rev = f"@{manifest['revision']}" if manifest.get("revision") else ""
        verb = "downloaded" if copied else "already up to date:"
        size = sum(f["size"] for f in manifest["files"].values())
        print(
            f"{verb} {manifest['source']}{rev} -> {Path(args.out)} ({len(manifest['files'])} files, {size} bytes, "
            f"{manifest['digest']})"
        )
    return 0

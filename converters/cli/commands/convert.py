"""`ckptflow convert SRC OUT --to maxtext|hf`."""

import argparse
import re
import sys
import time

from converters.core.direction import Direction
from converters.errors import CkptflowError

DESCRIPTION = """\
Convert a checkpoint in either direction, streaming one tensor (or one layer slice) at a time.

--to maxtext: SRC is a Hugging Face folder (config.json + *.safetensors). OUT becomes a MaxText
  checkpoint: pass OUT/0/items to MaxText as load_parameters_path. The source config and tokenizer
  are kept in OUT/ckptflow/hf so converting back needs no extra arguments.
--to hf: SRC is a MaxText checkpoint (ours, OUT/0/items, or a training run's directory: only the
  parameters are read). Scanned or unscanned layout is detected from the checkpoint. OUT becomes a
  folder that transformers.AutoModelForCausalLM.from_pretrained loads.

OUT is written to a temporary sibling and moved into place only when complete.

Splitting one conversion over N processes or pods (very large models):
  run `--part I/N` for every I in 0..N-1 (at once, anywhere that sees SRC and OUT's folder), then
  `--finalize` once, all with the same SRC, OUT and options. Each part converts a contiguous run of
  the work balanced by bytes (--to maxtext: layer and expert slices, as process I of Orbax's
  multi-process layout; --to hf: whole shards) into .OUT.ckptflow-parts/ beside OUT, and reads only
  the source files that run needs. A part that fails is simply run again; the others are kept.
  --finalize checks that every part of this same conversion finished intact (refusing missing or
  stale ones), assembles OUT from them without copying, writes the manifest and publishes OUT
  atomically. The result equals a single-process conversion array for array.

examples:
  ckptflow convert ./Qwen3-0.6B ./qwen3-mt --to maxtext --scan
  ckptflow convert ./Qwen3-0.6B ./qwen3-mt-unscanned --to maxtext --no-scan --dtype float32
  ckptflow convert ./qwen3-mt ./qwen3-hf --to hf
  ckptflow convert gs-mounted/run/checkpoints ./llama-hf --to hf --model llama3.1-8b
  for i in 0 1 2 3; do ckptflow convert ./DeepSeek-V3 /shared/ds3-mt --to maxtext --part $i/4 & done; wait
  ckptflow convert ./DeepSeek-V3 /shared/ds3-mt --to maxtext --finalize
"""


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return int(float(m[1]) * 1024 ** "_KMGT".index(m[2].upper() or "_"))


def _share(text: str) -> tuple[int, int]:
    from converters.convert.shares import parse_share

    try:
        return parse_share(text)
    except CkptflowError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub):
    p = sub.add_parser(
        "convert",
        help="convert HF <-> MaxText",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="HF model folder (--to maxtext) or MaxText checkpoint (--to hf)")
    p.add_argument("out", metavar="OUT", help="destination folder (must not exist unless --overwrite)")
    p.add_argument("--to", required=True, choices=[d.value for d in Direction], help="target format")
    p.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--to maxtext: stack layers (MaxText scan_layers=true, the default) or write layers_<i> (--no-scan); "
        "--to hf detects the layout itself",
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the written weights (default bfloat16). Transforms that change values are computed in float32 "
        "and rounded once",
    )
    p.add_argument(
        "--model",
        metavar="NAME",
        help="MaxText model name (see `ckptflow models`) supplying the HF config when SRC has none",
    )
    p.add_argument("--hf-config", metavar="PATH", help="an HF config.json to use instead of the one in/beside SRC")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT if it exists (the old one stays until the new one is complete)",
    )
    p.add_argument(
        "--no-ocdbt",
        dest="ocdbt",
        action="store_false",
        help="--to maxtext: write without OCDBT (one directory per array)",
    )
    p.add_argument(
        "--no-zarr3", dest="zarr3", action="store_false", help="--to maxtext: write zarr v2 arrays instead of zarr3"
    )
    p.add_argument(
        "--compress",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="--to maxtext: zstd-compress the stored arrays as Orbax (and MaxText's to_maxtext) does by default. "
        "Off by default: bf16 weights shrink only a few percent and compressing on the CPU costs ~1.7x the "
        "conversion time; MaxText restores both the same way",
    )
    p.add_argument(
        "--pathways", action="store_true", help="--to maxtext: shorthand for --no-ocdbt --no-zarr3, what Pathways loads"
    )
    p.add_argument(
        "--with-mtp",
        action="store_true",
        help="--to maxtext: also convert DeepSeek-V3's multi-token-prediction layer into mtp_block (skipped by "
        "default, "
        "as MaxText's converter does); --to hf exports mtp_block whenever the checkpoint has it",
    )
    p.add_argument(
        "--shard-size",
        type=_size,
        default="5GB",
        metavar="SIZE",
        help="--to hf: largest safetensors shard (default 5GB)",
    )
    p.add_argument(
        "--buffer-size",
        type=_size,
        metavar="SIZE",
        help="--to maxtext: data each worker buffers before committing it to the checkpoint (default 64MB). "
        "Peak memory is about (workers + 1) x SIZE + (2 x workers + 1) x the largest layer slice or "
        "tensor; smaller saves memory at the cost of more commits",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        metavar="N",
        help="arrays converted concurrently (default 2; memory grows with it)",
    )
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--part",
        metavar="I/N",
        type=_share,
        help="convert only this process's share: part I (0-based) of N, into the staging folder beside OUT; see above",
    )
    split.add_argument(
        "--finalize",
        action="store_true",
        help="assemble OUT from the N finished parts (same SRC, OUT and options as the parts)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    from converters.cli.progress import byte_bar
    from converters.convert import hf_to_maxtext, maxtext_to_hf

    if args.workers < 1:
        raise CkptflowError("--workers must be at least 1")
    direction = Direction(args.to)
    bar = byte_bar(f"-> {direction.target}", enabled=not args.quiet)
    t0 = time.monotonic()
    try:
        if direction is Direction.TO_MAXTEXT:
            r = hf_to_maxtext(
                args.src,
                args.out,
                scan=args.scan,
                dtype=args.dtype,
                model=args.model,
                hf_config=args.hf_config,
                overwrite=args.overwrite,
                use_ocdbt=args.ocdbt and not args.pathways,
                use_zarr3=args.zarr3 and not args.pathways,
                compress=args.compress,
                workers=args.workers,
                progress=bar,
                with_mtp=args.with_mtp,
                part=args.part,
                finalize=args.finalize,
                buffer_bytes=args.buffer_size,
            )
            where = f"{r.out}/0/items (load_parameters_path)"
        else:
            r = maxtext_to_hf(
                args.src,
                args.out,
                dtype=args.dtype,
                model=args.model,
                hf_config=args.hf_config,
                overwrite=args.overwrite,
                shard_bytes=args.shard_size,
                progress=bar,
                part=args.part,
                finalize=args.finalize,
            )
            where = str(r.out)
        if args.part is not None:
            from converters.convert.shares import share_name, staging_dir

            where = f"part {args.part[0]}/{args.part[1]} -> {staging_dir(args.out) / share_name(*args.part)}"
    finally:
        for b in getattr(bar, "bars", ()):
            b.close()
    dt = time.monotonic() - t0
    print(
        f"wrote {r.family} checkpoint: {where}  [{r.tensors} tensors, {r.bytes / 1e9:.2f} GB in {dt:.1f}s, "
        f"{r.bytes / 1e6 / max(dt, 1e-9):.0f} MB/s]",
        file=sys.stderr,
    )
    print(r.out)
    return 0

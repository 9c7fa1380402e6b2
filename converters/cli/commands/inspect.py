"""`ckptflow inspect PATH`: tree, shapes, dtypes and bytes of a checkpoint, and its manifest."""

import argparse
import json
import math
from pathlib import Path

from converters.errors import CkptflowError

DESCRIPTION = """\
Show what a checkpoint holds: every array (MaxText/Orbax) or tensor (HF safetensors folder) with
shape, dtype and size, the layout (scanned or not), and the ckptflow manifest when present.
Nothing is loaded but headers and metadata.

examples:
  ckptflow inspect ./llama-mt            # or ./llama-mt/0/items
  ckptflow inspect ./Llama-3.1-8B --json
"""


def add_parser(sub):
    p = sub.add_parser(
        "inspect",
        help="show tree, shapes, dtypes and bytes of a checkpoint",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("path", metavar="PATH", help="MaxText checkpoint or HF safetensors folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def describe(path: str) -> dict:
    from converters.io.safetensors import is_safetensors_folder
    from converters.outputs.manifest import MANIFEST

    p = Path(path)
    if is_safetensors_folder(p):
        from converters.io.safetensors import SafetensorsFolder

        f = SafetensorsFolder(p)
        arrays = {
            n: {"shape": list(t.shape), "dtype": str(t.dtype), "bytes": t.nbytes, "file": t.path.name}
            for n, t in sorted(f.tensors.items())
        }
        info = {"format": "hf-safetensors", "path": str(p)}
        cfg = p / "config.json"
        if cfg.exists():
            c = json.loads(cfg.read_text())
            info["model_type"] = c.get("model_type")
            info["architectures"] = c.get("architectures")
    else:
        from converters.io.orbax import CheckpointReader

        r = CheckpointReader(p)
        arrays = {}
        for k in sorted(r.arrays):
            shape, dtype = r.shape(k), r.dtype(k)
            arrays[k] = {"shape": list(shape), "dtype": str(dtype), "bytes": math.prod(shape) * dtype.itemsize}
        info = {
            "format": "maxtext-orbax",
            "path": str(r.items),
            "scan_layers": r.scan_layers(),
            "use_ocdbt": r.use_ocdbt,
            "use_zarr3": r.use_zarr3,
        }
        p = r.root
    info["arrays"] = arrays
    info["total_bytes"] = sum(a["bytes"] for a in arrays.values())
    if (p / MANIFEST).exists():
        info["manifest"] = json.loads((p / MANIFEST).read_text())
    return info


def print_lineage(m: dict) -> None:
    """The lineage manifest in a few lines: source (repo@sha or path), converter, options, digests, verify."""
    src = m.get("source") or {}
    origin = (
        f"{src['uri']}@{src['revision']}"
        if src.get("uri") and src.get("revision")
        else src.get("uri") or src.get("path")
    )
    hashed = sum(1 for f in (src.get("files") or {}).values() if isinstance(f, dict) and f.get("sha256"))
    print(
        f"manifest: {m.get('direction')} {m.get('family')} {json.dumps(m.get('options'))} by ckptflow "
        f"{m.get('ckptflow_version')}, "
        f"created {m.get('created')}"
    )
    print(f"  source: {origin}" + (f" ({hashed} files with sha256)" if hashed else ""))
    outs = m.get("outputs") or {}
    algo = next(
        (a for a in ("blake3", "sha256") if outs and all(isinstance(o, dict) and o.get(a) for o in outs.values())), None
    )
    print(
        f"  outputs: {len(outs)} files, {sum(o.get('bytes') or 0 for o in outs.values())} bytes"
        + (f", {algo} of each" if algo else "")
        + (f"; output digest {m['output_digest']}" if m.get("output_digest") else "")
    )
    v = m.get("verify")
    if v:
        verdict = "passed" if v.get("passed") else "FAILED"
        print(
            f"  verify: {verdict}, max KL {v.get('kl_max')} (threshold {v.get('max_kl_threshold')}), "
            f"{v.get('num_tokens')} tokens"
        )


def run(args) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['format']}: {info['path']}")
    for k in ("model_type", "scan_layers", "use_ocdbt", "use_zarr3"):
        if k in info:
            print(f"  {k}: {info[k]}")
    width = max((len(n) for n in info["arrays"]), default=10)
    for n, a in info["arrays"].items():
        print(f"  {n:<{width}}  {str(a['shape']):<24} {a['dtype']:<9} {a['bytes'] / 1e6:10.2f} MB")
    print(f"  {len(info['arrays'])} arrays, {info['total_bytes'] / 1e9:.3f} GB")
    m = info.get("manifest")
    if m:
        print_lineage(m)
    if not info["arrays"]:
        raise CkptflowError(f"{args.path}: no arrays found")
    return 0

"""`make demo`: build a tiny Llama 3.1 locally, convert it HF -> MaxText (scanned) -> HF, and show what was written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

OUT = Path("demo-output")


def ckptflow(*args: str) -> None:
    print("$ ckptflow", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "converters", *args], check=True)


def main() -> int:
    OUT.mkdir(exist_ok=True)
    ckptflow("make-test-model", "llama3.1", str(OUT / "hf-source"), "--layers", "4")
    ckptflow("convert", str(OUT / "hf-source"), str(OUT / "maxtext"), "--to", "maxtext", "--scan", "--overwrite")
    ckptflow("inspect", str(OUT / "maxtext"))
    ckptflow("convert", str(OUT / "maxtext"), str(OUT / "hf-roundtrip"), "--to", "hf", "--overwrite")
    print(f"\nMaxText checkpoint: {OUT / 'maxtext' / '0' / 'items'}\nHF round trip:      {OUT / 'hf-roundtrip'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

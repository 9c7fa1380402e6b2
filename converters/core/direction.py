"""Which way a conversion goes: the one `Direction` from the CLI to the DAG, and every way it is spelled.

The spellings are contracts and keep their values; each comes from the enum, never written out by hand:

    value    `ckptflow convert --to maxtext|hf` (the target format)     Direction.TO_MAXTEXT.value  "maxtext"
    param    the DAG's `direction` param, run conf, lineage, UI        Direction.TO_MAXTEXT.param  "hf-to-maxtext"
    record   manifests, share records and their fingerprints           Direction.TO_MAXTEXT.record "hf->maxtext"
    label()  `ckptflow models` (with the layout)                        .label(scan=True)    "hf->maxtext (scanned)"

Light to import (no dependencies): the DAG files, operators and UI use it.
"""

from __future__ import annotations

from enum import Enum

# format -> (short name, full name) as shown to people
_FORMAT_NAMES = {"hf": ("HF", "Hugging Face"), "maxtext": ("MaxText", "MaxText")}


class Direction(Enum):
    """A conversion's direction, valued by its target format (what `--to` takes)."""

    TO_MAXTEXT = "maxtext"  # HF safetensors -> MaxText (Orbax)
    TO_HF = "hf"  # MaxText (Orbax) -> HF safetensors

    @property
    def target(self) -> str:
        """The format written: `maxtext` or `hf` (`--to`)."""
        return self.value

    @property
    def source(self) -> str:
        """The format read: `hf` or `maxtext` (`ckptflow download --format`)."""
        return Direction.TO_HF.value if self is Direction.TO_MAXTEXT else Direction.TO_MAXTEXT.value

    @property
    def param(self) -> str:
        """The DAG param's value (also in run confs, lineage and the UI): `hf-to-maxtext`, `maxtext-to-hf`."""
        return f"{self.source}-to-{self.target}"

    @property
    def record(self) -> str:
        """What manifests and share records say: `hf->maxtext`, `maxtext->hf`."""
        return f"{self.source}->{self.target}"

    def label(self, scan: bool) -> str:
        """With the MaxText layout: `hf->maxtext (scanned)`, `maxtext->hf (unscanned)`, ..."""
        return f"{self.record} ({layout(scan)})"

    @property
    def title(self) -> str:
        """For forms: `Hugging Face -> MaxText`."""
        return f"{_FORMAT_NAMES[self.source][1]} -> {_FORMAT_NAMES[self.target][1]}"

    @property
    def arrow(self) -> str:
        """For tables: `HF → MaxText`."""
        return f"{_FORMAT_NAMES[self.source][0]} → {_FORMAT_NAMES[self.target][0]}"

    @classmethod
    def from_param(cls, text: object) -> Direction:
        """The direction a DAG param names; ValueError for anything else."""
        for d in cls:
            if text == d.param:
                return d
        raise ValueError(f"direction must be one of {', '.join(d.param for d in cls)}, got {text!r}")

    @classmethod
    def from_record(cls, text: object) -> Direction | None:
        """The direction a manifest or share record names, None for anything else."""
        return next((d for d in cls if text == d.record), None)


def layout(scan: bool) -> str:
    """MaxText's layer layout as ckptflow names it: `scanned` (stacked layers) or `unscanned`."""
    return "scanned" if scan else "unscanned"

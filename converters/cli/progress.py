"""Progress bars on stderr (bytes and bytes/s) for long operations."""

from __future__ import annotations

import sys


def byte_bar(desc: str, enabled: bool = True):
    """A factory `(total_bytes, count) -> bar` for the converters' `progress=` argument."""
    from tqdm import tqdm

    def make(total: int, count: int):
        bar = tqdm(
            total=total,
            desc=f"{desc} ({count} arrays)",
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            mininterval=0.5,
        )
        make.bars.append(bar)
        return bar

    make.bars = []  # closed by the command when a run fails, so its error line starts on a line of its own
    return make

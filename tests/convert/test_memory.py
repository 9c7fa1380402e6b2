"""Peak memory does not grow with the model: stacked arrays are written and read slice by slice.

The model here has stacked arrays (e.g. the scanned `mlp/wi_0`, 16 layers x 1024 x 8192 bf16 = 268 MB)
far larger than the budget we allow for growth, so holding any whole stack in RAM would fail the test.
Peak RSS is compared between a 2-layer and a 16-layer model of the same width: the difference must stay
under 80 MB (noise of allocator and tensorstore caches) while the model grows by ~820 MB. The write buffer
(`--buffer-size`, data each worker gathers before committing) is set to one 16 MB layer slice: with the
64 MB default, a 16-layer stack fills transactions a 2-layer one (two 16 MB slices per array) never does, a
constant the test is not about.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from converters.core import registry
from converters.tiny_models import write_synthetic_checkpoint

WIDE = {
    "hidden_size": 1024,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 8192,
    "vocab_size": 32000,
}
GROWTH_BUDGET = 80 << 20

RUN = (
    "import resource, sys; from converters.cli.main import main; rc = main(sys.argv[1:]); "
    "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr); sys.exit(rc)"
)


def peak_rss(*args: str) -> int:
    p = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return int(p.stderr.rsplit("MAXRSS", 1)[1].split()[0])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    out = {}
    for layers in (2, 16):
        cfg = registry.model("llama3.1-8b")[1]
        cfg.update(WIDE, num_hidden_layers=layers)
        out[layers] = write_synthetic_checkpoint(root / f"hf{layers}", cfg)
    return out


@pytest.mark.parametrize("scan", ["--scan", "--no-scan"])
def test_peak_rss_does_not_grow_with_layers(models, tmp_path, scan):
    peaks = {}
    for layers, src in models.items():
        mt = tmp_path / f"mt{layers}"
        to_mt = peak_rss("convert", str(src), str(mt), "--to", "maxtext", scan, "--buffer-size", "16MB", "-q")
        to_hf = peak_rss("convert", str(mt), str(tmp_path / f"hf{layers}"), "--to", "hf", "-q")
        peaks[layers] = (to_mt, to_hf)
    stacked = 16 * 1024 * 8192 * 2
    for direction in (0, 1):
        growth = peaks[16][direction] - peaks[2][direction]
        assert growth < GROWTH_BUDGET < stacked, (direction, peaks)

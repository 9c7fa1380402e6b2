"""What the benchmarks share: synthetic models of real dimensions, a cold page cache, and one command run as
its own process with its wall time, the peak RSS of its whole process tree, and the share of the CPUs other
processes took meanwhile (a busy machine inflates wall times).

Used by `bench/convert_bench.py` and `bench/verify_bench.py` (run as scripts: this folder is on sys.path).
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from converters.core import registry  # noqa: E402
from converters.families.deepseek import KIMI_K2_THINKING_INT4_GROUP, KIMI_K2_THINKING_QUANTIZATION  # noqa: E402
from converters.tiny_models import write_synthetic_checkpoint  # noqa: E402


class PeakRSS:
    """Samples the summed RSS of a process and its children every 50 ms (and, on the way, their CPU seconds)."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.cpu: dict[int, float] = {}  # pid -> user + system seconds at its last sample
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
                for p in procs:
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
            except psutil.Error:
                pass
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def drop_caches() -> None:
    """Best effort: make every step read from disk, not from the page cache of the previous one."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@dataclass
class Run:
    """One measured process: exit status, wall seconds (including the final `sync`), peak RSS of its tree."""

    returncode: int
    wall_s: float
    peak_bytes: int
    stdout: str | None
    stderr: str
    others_cpu_share: float = 0.0  # CPU time of processes outside the tree during the run / (wall x cores)

    @property
    def peak_rss_GB(self) -> float:
        return round(self.peak_bytes / 1e9, 3)


def run_measured(cmd: list[str], *, cold: bool, capture_stdout: bool = False) -> Run:
    """Run `cmd` (after dropping the page cache when `cold`), sampling its tree's RSS; the clock stops after a
    `sync`, so that data the process left in the page cache counts as written. A failure is returned, not raised."""
    if cold:
        drop_caches()
    busy0 = busy_cpu_seconds()
    t0 = time.monotonic()
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    mon = PeakRSS(p.pid)
    out, err = p.communicate()
    subprocess.run(["sync"], check=True)
    wall = time.monotonic() - t0
    peak = mon.stop()
    others = max(0.0, busy_cpu_seconds() - busy0 - sum(mon.cpu.values())) / (wall * (psutil.cpu_count() or 1))
    return Run(p.returncode, round(wall, 2), peak, out, err, round(others, 3))


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent not idle (nor waiting for I/O) since boot."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def pyplot():
    """matplotlib.pyplot drawing to files (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def synthetic_config(model: str, layers: int) -> dict:
    """The published HF config of `model` (a MaxText model name) with `layers` decoder layers: for a multimodal config
    (Qwen3.5, Llama 4) its `text_config`'s, and a per-layer `layer_types` list cut to the first `layers`."""
    cfg = registry.model(model)[1]
    text = cfg.get("text_config", cfg)
    text["num_hidden_layers"] = layers
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:layers]
    return cfg


def synthetic_params(model: str, layers: int) -> int:
    """Parameter count of `synthetic_model(model, layers)` (every HF tensor it writes, once: a split rule plans one
    leaf per part of the same HF tensor)."""
    cfg = synthetic_config(model, layers)
    shapes = {
        name: leaf.hf_shape
        for leaf in registry.family_for_config(cfg).plan(cfg, scan=False)
        for _, name in leaf.hf_names()
    }
    return sum(math.prod(s) for s in shapes.values())


def synthetic_model(model: str, layers: int, dest: Path, quant: str | None = None) -> Path:
    """Random bf16 weights of `model`'s real dimensions with `layers` layers in `dest`, unless it already exists
    (written tensor by tensor, never held in memory whole). `quant` "int4": the routed experts as Kimi-K2-Thinking
    stores them (`write_synthetic_int4`); "fp4": FP4 experts and FP8 linears as DeepSeek-V4-Flash
    (`write_synthetic_fp4`)."""
    if not dest.exists():
        kind = f"{quant}-expert" if quant else "bf16"
        print(f"building synthetic {kind} {model} with {layers} layers in {dest} ...", file=sys.stderr)
        writers = {None: write_synthetic_checkpoint, "int4": write_synthetic_int4, "fp4": write_synthetic_fp4}
        writers[quant](dest, synthetic_config(model, layers))
    return dest


def write_synthetic_int4(out: Path, cfg: dict, shard_bytes: int = 5 << 30, seed: int = 0) -> Path:
    """As `write_synthetic_checkpoint`, but every routed expert's weight stored as compressed-tensors pack-quantized
    int4 (Kimi-K2-Thinking): `X_packed` int32 `[out, in/8]` (random codes: every nibble is a valid code),
    `X_scale` bf16 `[out, in/32]` (random, |s| in [2^-7, 2^-5)), `X_shape` int32 `[2]`; the rest random bf16."""
    import ml_dtypes
    import numpy as np

    from converters.io.safetensors import PlannedTensor
    from converters.tiny_models import hf_shapes, random_bf16, write_random_safetensors

    bf16 = np.dtype(ml_dtypes.bfloat16)
    shapes = hf_shapes(cfg)
    tensors = []
    for name, shape in shapes.items():
        if (
            ".mlp.experts." in name
            and name.endswith(".weight")
            and len(shape) == 2
            and shape[1] % KIMI_K2_THINKING_INT4_GROUP == 0
        ):
            tensors += [
                PlannedTensor(name + "_packed", (shape[0], shape[1] // 8), np.dtype(np.int32)),
                PlannedTensor(name + "_scale", (shape[0], shape[1] // KIMI_K2_THINKING_INT4_GROUP), bf16),
                PlannedTensor(name + "_shape", (2,), np.dtype(np.int32)),
            ]
        else:
            tensors.append(PlannedTensor(name, shape, bf16))

    def fill(t, size, rng):
        if t.name.endswith("_shape"):
            return np.array(shapes[t.name[: -len("_shape")]], np.int32)
        if t.dtype == np.int32:
            return rng.integers(0, 1 << 32, size=size, dtype=np.uint32).view(np.int32)
        return random_bf16(t, size, rng)

    cfg = {**cfg, "quantization_config": KIMI_K2_THINKING_QUANTIZATION}
    return write_random_safetensors(out, tensors, cfg, shard_bytes=shard_bytes, seed=seed, fill=fill)


def write_synthetic_fp4(out: Path, cfg: dict, shard_bytes: int = 5 << 30, seed: int = 0) -> Path:
    """As `write_synthetic_checkpoint`, but quantized as deepseek-ai/DeepSeek-V4-Flash ships it
    (converters/io/quantized_fp8.py): routed experts FP4 as `I8` `[out, in/2]` (random bytes: every nibble is a
    valid code) with `F8_E8M0` `<m>.scale` `[out, in/32]`, the FP8 linears `F8_E4M3` (random codes but NaN) with
    `F8_E8M0` `[ceil(out/128), ceil(in/128)]` scales, all scales 2^-7..2^0; the rest random bf16."""
    import ml_dtypes
    import numpy as np

    from converters.io.quantized_fp8 import E8M0, FP4_GROUP, FP8, V4_FP4_EXPERT, V4_FP8_LINEAR
    from converters.io.safetensors import PlannedTensor
    from converters.tiny_models import hf_shapes, random_bf16, write_random_safetensors

    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "fp8" or qc.get("weight_block_size") != [128, 128]:
        raise SystemExit(f"--fp4: {cfg.get('model_type')} has no DeepSeek-V4 quantization_config")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    tensors = []
    for name, shape in hf_shapes(cfg).items():
        scale = name[: -len(".weight")] + ".scale"
        if V4_FP4_EXPERT.search(name):
            tensors += [
                PlannedTensor(name, (shape[0], shape[1] // 2), np.dtype(np.int8)),
                PlannedTensor(scale, (shape[0], shape[1] // FP4_GROUP), E8M0),
            ]
        elif V4_FP8_LINEAR.search(name):
            tensors += [
                PlannedTensor(name, shape, FP8),
                PlannedTensor(scale, (-(-shape[0] // 128), -(-shape[1] // 128)), E8M0),
            ]
        else:
            tensors.append(PlannedTensor(name, shape, bf16))

    def fill(t, size, rng):
        if t.dtype == E8M0:
            return rng.integers(120, 128, size=size, dtype=np.uint8).view(E8M0)
        if t.dtype in (FP8, np.int8):
            b = rng.integers(0, 256, size=size, dtype=np.uint8)
            if t.dtype == FP8:
                b[(b & 0x7F) == 0x7F] = 0x7E  # no NaN codes
            return b.view(t.dtype)
        return random_bf16(t, size, rng)

    cfg = {**cfg, "expert_dtype": "fp4"}
    return write_random_safetensors(out, tensors, cfg, shard_bytes=shard_bytes, seed=seed, fill=fill)

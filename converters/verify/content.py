"""Content: does the checkpoint hold this source's weights?

Every HF tensor is mapped back from the checkpoint exactly as `convert --to hf` computes it (the family's
inverse chain, in float32, then cast to the source tensor's dtype) and compared with the source folder's tensor.

The bound a correct conversion meets, per tensor kind:
  * the chain only moves elements (transposes, reshapes, permutations, splits) and the checkpoint's dtype holds
    the source dtype's values (bf16 -> bf16 or float32): bit-exact;
  * otherwise every stored element is the source element, transformed and correctly rounded to the checkpoint's
    dtype: |back - x| <= 1/2 ulp_ckpt(y) * |d inverse / d y| + 1/2 ulp_src(x) + 1 ulp_f32(x), where y is the stored
    (transformed) value: half an ulp of the stored value carried back through the inverse (a scale divides it,
    an offset keeps it), then the rounding of the cast to the source dtype, then float32 arithmetic.
    Llama's query x 1/sqrt(head_dim) in bfloat16 comes back within 1 ulp of bfloat16; Gemma's norms stored as
    1 + w within half an ulp of (1 + w) plus half an ulp of w (an absolute bound: a bfloat16 checkpoint cannot
    hold a small w to better than ~2^-9); a float32 source in a bfloat16 checkpoint within half a bfloat16 ulp.
A tensor outside its bound fails the content check by name: a wrong source folder, an edited or corrupted
tensor, a swapped layer or expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from converters.core.transforms import Offset, Scale, Transform

MANTISSA_BITS = {"bfloat16": 7, "float16": 10, "float32": 23, "float64": 52}
MIN_EXPONENT = {"bfloat16": -126, "float16": -14, "float32": -126, "float64": -1022}
MAX_FAILURES = 20  # failures listed by name in the result (all are counted)


def ulp(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Spacing of `dtype`'s values at |x| (float64): 2^(exponent - mantissa bits), its smallest normal spacing at 0.
    The exponent is read from the bits of x (float32 or float64), not computed."""
    name = np.dtype(dtype).name
    m, lo = MANTISSA_BITS[name], MIN_EXPONENT[name]
    x = np.asarray(x)
    if x.dtype == np.float64:
        e = ((x.view(np.uint64) >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int32) - 1023
    else:
        e = ((to_float32(x).view(np.uint32) >> np.uint32(23)) & np.uint32(0xFF)).astype(np.int32) - 127
    return np.ldexp(1.0, np.maximum(e, lo) - m)


def to_float32(a: np.ndarray) -> np.ndarray:
    """Exact float32 values of a float array (no copy when it is float32 already)."""
    return a if a.dtype == np.float32 else a.astype(np.float32)


def from_float32(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 values rounded to `dtype` (nearest, ties to even), as `convert --to hf` writes them."""
    return a if np.dtype(dtype) == np.float32 else a.astype(dtype)


def value_steps(chain: tuple[Transform, ...]) -> list[Transform]:
    return [t for t in chain if not t.exact]


def describe_chain(chain: tuple[Transform, ...]) -> str | None:
    """What the stored value is, in words ("x * 0.0883883", "x + 1"), or None when the chain only moves elements."""
    steps = value_steps(chain)
    if not steps:
        return None
    text = "x"
    for t in steps:
        if isinstance(t, Scale):
            text = f"{text} * {t.factor:.6g}"
        elif isinstance(t, Offset):
            text = f"{text} + {t.value:g}"
        else:
            text = f"{type(t).__name__}({text})"
    return text


def _inverse_gain(steps: list[Transform]) -> float:
    """|d inverse / d y| of the value-changing steps: how much a stored rounding error grows on the way back."""
    gain = 1.0
    for t in steps:
        if isinstance(t, Scale):
            gain /= abs(t.factor)
        elif not isinstance(t, Offset):
            raise NotImplementedError(f"no content bound for {type(t).__name__}")
    return gain


def bound(x: np.ndarray, back: np.ndarray, chain: tuple[Transform, ...], ckpt_dtype: np.dtype) -> np.ndarray | None:
    """Per-element bound on |back - x| for a correct conversion (see the module docstring); None: bit-exact."""
    steps = value_steps(chain)
    src = np.dtype(x.dtype)
    if not steps and MANTISSA_BITS[np.dtype(ckpt_dtype).name] >= MANTISSA_BITS[src.name]:
        return None
    stored = back.astype(np.float32)
    for t in steps:  # the stored value's magnitude, from the back-mapped one (the steps are elementwise)
        stored = t.forward(stored)
    # ... rounded to the checkpoint's dtype: the stored value is one of its values. Recomputed in float32 it can land
    # just below a power of two the source rounded down to, where the spacing (and the bound) would be half as large.
    stored = from_float32(stored, ckpt_dtype)
    x32 = to_float32(x)
    out = 0.5 * ulp(stored, ckpt_dtype) * _inverse_gain(steps)
    if MANTISSA_BITS[src.name] < MANTISSA_BITS["float32"]:
        out += 0.5 * ulp(x32, src)
    return out + ulp(x32, np.float32)


@dataclass
class TensorResult:
    name: str
    kind: str
    exact: bool
    passed: bool
    identical: bool = False  # the checkpoint's value equals the source's as float32 (transformers computes the same)
    max_error: float = 0.0
    max_ulps: float = 0.0  # max |back - x| in ulps of the source dtype
    moved: float = 0.0  # fraction of elements that are not bit-exact
    over: int = 0  # elements outside the bound
    example: dict | None = None  # first element outside the bound


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def compare(
    name: str, kind: str, x: np.ndarray, back: np.ndarray, chain: tuple[Transform, ...], ckpt_dtype: np.dtype
) -> TensorResult:
    """Compare source tensor `x` with the checkpoint's value mapped back (`back`, same shape: in the stored dtype when
    the chain only moves elements, float32 when it changes them)."""
    if x.shape != back.shape:
        return TensorResult(
            name,
            kind,
            False,
            False,
            example={"why": f"shape {list(back.shape)} in the checkpoint, {list(x.shape)} in the source"},
        )
    if back.dtype == x.dtype and np.array_equal(_bits(back), _bits(x)):  # the usual case: moved, not changed
        return TensorResult(name, kind, True, True, identical=True)
    if back.dtype != x.dtype and np.array_equal(to_float32(back), to_float32(x)):
        return TensorResult(name, kind, True, True, identical=True)
    out = from_float32(to_float32(back), x.dtype)  # what `convert --to hf` writes
    same = _bits(np.ascontiguousarray(out)) == _bits(np.ascontiguousarray(x))
    if same.all():
        return TensorResult(name, kind, True, True)
    moved = np.flatnonzero(~same.ravel())  # the bound is evaluated where the values differ only
    xd = x.ravel()[moved]
    xf, of = to_float32(xd).astype(np.float64), to_float32(out.ravel()[moved]).astype(np.float64)
    err = np.abs(of - xf)
    limit = bound(xd, back.ravel()[moved], chain, ckpt_dtype)
    over = np.ones(len(moved), bool) if limit is None else ~(err <= limit)  # NaN errors are over
    finite = np.isfinite(err).any()
    res = TensorResult(
        name,
        kind,
        False,
        not over.any(),
        max_error=float(np.nanmax(err)) if finite else math.inf,
        max_ulps=float(np.nanmax(err / ulp(xf, x.dtype))) if finite else math.inf,
        moved=len(moved) / x.size,
        over=int(over.sum()),
    )
    if over.any():
        j = int(np.argmax(over))
        res.example = {
            "index": [int(v) for v in np.unravel_index(int(moved[j]), x.shape)],
            "source": float(xf[j]),
            "checkpoint": float(of[j]),
            "bound": None if limit is None else float(limit[j]),
        }
    return res


@dataclass
class KindSummary:
    transform: str | None
    tensors: int = 0
    bit_exact: int = 0
    max_error: float = 0.0
    max_ulps: float = 0.0
    moved: float = 0.0  # largest fraction of moved elements in one tensor


@dataclass
class ContentCheck:
    """Accumulates per-tensor results (a tensor may arrive in several pieces: experts, vocabulary blocks)."""

    ckpt_dtype: str
    source_dtype: str | None = None
    results: dict[str, TensorResult] = field(default_factory=dict)
    kinds: dict[str, KindSummary] = field(default_factory=dict)

    def check(
        self, name: str, kind: str, x: np.ndarray, back: np.ndarray, chain: tuple[Transform, ...], ckpt_dtype: np.dtype
    ) -> bool:
        """Compare one tensor (or piece of one); True when the checkpoint's values equal the source's as float32."""
        r = compare(name, kind, x, back, chain, ckpt_dtype)
        identical = r.identical
        self.source_dtype = self.source_dtype or np.dtype(x.dtype).name
        k = self.kinds.setdefault(kind, KindSummary(describe_chain(chain)))
        prev = self.results.get(name)
        if prev is None:
            self.results[name] = r
            k.tensors += 1
        else:  # another piece of the same tensor: merge
            if prev.passed and not r.passed:
                prev.example = r.example
            prev.passed &= r.passed
            prev.exact &= r.exact
            prev.over += r.over
            prev.max_error, prev.max_ulps = max(prev.max_error, r.max_error), max(prev.max_ulps, r.max_ulps)
            prev.moved = max(prev.moved, r.moved)
            r = prev
        k.max_ulps = max(k.max_ulps, r.max_ulps)
        k.max_error = max(k.max_error, r.max_error)
        k.moved = max(k.moved, r.moved)
        return identical

    def finish(self) -> None:
        for k in self.kinds.values():
            k.bit_exact = 0
        for r in self.results.values():
            if r.exact:
                self.kinds[r.kind].bit_exact += 1

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results.values())

    def failures(self) -> list[TensorResult]:
        return [r for r in self.results.values() if not r.passed]

    def effects(self) -> list[str]:
        """The format's known rounding, in words, one line per value change (none of it an error)."""
        groups: dict[str | None, list[str]] = {}
        for kind, k in sorted(self.kinds.items()):
            if k.bit_exact < k.tensors:
                groups.setdefault(k.transform, []).append(kind)
        out = []
        for transform, kinds in groups.items():
            ks = [self.kinds[kind] for kind in kinds]
            what = f"stored as {transform}" if transform else f"{self.source_dtype} values stored"
            names = ", ".join(kinds[:4]) + (f" and {len(kinds) - 4} more" if len(kinds) > 4 else "")
            out.append(
                f"{what} in {self.ckpt_dtype} ({names}): up to {max(k.moved for k in ks):.0%} of a tensor's elements "
                f"come "
                f"back changed, by at most {max(k.max_error for k in ks):.2g} ({max(k.max_ulps for k in ks):.2g} ulp "
                f"of "
                f"{self.source_dtype}): the format's rounding, within its bound"
            )
        return out

    def to_dict(self) -> dict:
        self.finish()
        fails = self.failures()
        return {
            "passed": self.passed,
            "tensors": len(self.results),
            "bit_exact": sum(r.exact for r in self.results.values()),
            "within_bound": sum(r.passed and not r.exact for r in self.results.values()),
            "failed": len(fails),
            "failures": [
                {
                    "tensor": r.name,
                    "kind": r.kind,
                    "elements_outside_bound": r.over,
                    "max_abs_error": r.max_error,
                    "max_ulps": r.max_ulps,
                    "example": r.example,
                }
                for r in fails[:MAX_FAILURES]
            ],
            "kinds": {
                kind: {
                    "transform": k.transform,
                    "tensors": k.tensors,
                    "bit_exact": k.bit_exact,
                    "max_abs_error": k.max_error,
                    "max_ulps": k.max_ulps,
                    "moved_fraction": k.moved,
                }
                for kind, k in sorted(self.kinds.items())
            },
            "checkpoint_dtype": self.ckpt_dtype,
            "source_dtype": self.source_dtype,
            "effects": self.effects(),
        }

"""Comparison metrics between two sides' logits, accumulated one vocabulary block at a time.

Logits arrive in blocks of columns (`[T, Vb]` for every position of a prompt); nothing of size positions x
vocabulary is kept. Per position, each side's log-sum-exp is accumulated with a running maximum, and so is
S = sum_v exp(r_v - m) (r_v - t_v) over the reference's distribution, so that at the end

    KL(P_ref || Q_test) = S / sum_v exp(r_v - m) - lse(r) + lse(t)

which is sum_v p(v) (log p(v) - log q(v)) over the full distributions. Everything is float64, so the
measurement adds no noise at the 1e-9 level the float32 checks use. Top-k lists are merged across blocks
(ties broken by the lower id). The vocabulary is cut to the smaller side before the softmax: MaxText pads its
embedding table and the padded rows are not part of the model's distribution (MaxText's
forward_pass_logit_checker does the same).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field

import numpy as np

TOP_K = 10


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def cut_vocab(ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both `[T, V*]` arrays cut to a common vocabulary `[T, min(V_ref, V_test)]`."""
    if ref.ndim != 2 or test.ndim != 2:
        raise ValueError(f"expected [positions, vocab] logits, got {ref.shape} and {test.shape}")
    if ref.shape[0] != test.shape[0]:
        raise ValueError(f"position counts differ: {ref.shape[0]} vs {test.shape[0]}")
    v = min(ref.shape[1], test.shape[1])
    return ref[:, :v], test[:, :v]


def kl_per_token(ref_logits: np.ndarray, test_logits: np.ndarray) -> np.ndarray:
    """Per-position KL(P_ref || Q_test) of two whole `[T, V]` arrays, shape [T] (float64)."""
    ref_logits, test_logits = cut_vocab(ref_logits, test_logits)
    logp = _log_softmax(ref_logits)
    logq = _log_softmax(test_logits)
    p = np.exp(logp)
    return np.sum(p * (logp - logq), axis=-1)


def top_k(logits_row: np.ndarray, k: int = TOP_K) -> list[tuple[int, float]]:
    """(id, logit) of the k largest logits, best first; ties broken by the lower id."""
    row = np.asarray(logits_row, dtype=np.float64)
    order = np.lexsort((np.arange(row.shape[0]), -row))[:k]
    return [(int(i), float(row[i])) for i in order]


class LogSumExp:
    """Running log-sum-exp per position."""

    def __init__(self, n: int):
        self.m = np.full(n, -np.inf)
        self.s = np.zeros(n)

    def update(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add a block `[T, Vb]` (float64). Returns (exp(x - m) on the new maximum, the factor exp(m_old - m_new) by
        which sums kept on the old maximum must be rescaled)."""
        m = np.maximum(self.m, x.max(axis=1))
        m = np.where(np.isfinite(m), m, 0.0)  # a NaN row (caught by the caller): keep the arithmetic going
        scale = np.exp(self.m - m)  # the first block: exp(-inf) = 0
        w = np.exp(x - m[:, None])
        self.s = self.s * scale + w.sum(axis=1)
        self.m = m
        return w, scale

    @property
    def value(self) -> np.ndarray:
        return self.m + np.log(self.s)


class TopK:
    """The k best (logit, id) of one position, merged block by block."""

    def __init__(self, k: int = TOP_K):
        self.k = k
        self.ids = np.zeros(0, np.int64)
        self.vals = np.zeros(0)

    def update(self, row: np.ndarray, v0: int) -> None:
        n = min(self.k, row.shape[0])
        part = np.argpartition(-row, n - 1)[:n] if n < row.shape[0] else np.arange(row.shape[0])
        ids = np.concatenate([self.ids, part + v0])
        vals = np.concatenate([self.vals, row[part]])
        order = np.lexsort((ids, -vals))[: self.k]
        self.ids, self.vals = ids[order], vals[order]

    def items(self) -> list[tuple[int, float]]:
        return [(int(i), float(v)) for i, v in zip(self.ids, self.vals)]


@dataclass
class TopKComparison:
    ref: list[tuple[int, float]]
    test: list[tuple[int, float]]
    overlap: int  # |ref ids ∩ test ids|
    jaccard: float  # |∩| / |∪|
    rank_agreement: float  # fraction of ranks holding the same id on both sides

    @property
    def k(self) -> int:
        return min(len(self.ref), len(self.test))


def compare_top_k_lists(ref: list[tuple[int, float]], test: list[tuple[int, float]]) -> TopKComparison:
    a, b = {i for i, _ in ref}, {i for i, _ in test}
    n = min(len(ref), len(test))
    same_rank = sum(1 for r in range(n) if ref[r][0] == test[r][0])
    return TopKComparison(
        ref, test, len(a & b), len(a & b) / len(a | b) if (a | b) else 0.0, same_rank / n if n else 0.0
    )


def compare_top_k(ref_row: np.ndarray, test_row: np.ndarray, k: int = TOP_K) -> TopKComparison:
    v = min(ref_row.shape[-1], test_row.shape[-1])
    return compare_top_k_lists(top_k(ref_row[:v], k), top_k(test_row[:v], k))


@dataclass
class PromptMetrics:
    name: str
    num_tokens: int
    kl_per_token: list[float]
    kl_mean: float
    kl_max: float
    kl_argmax: int
    max_abs_logit_diff: float
    top1_agreement: float  # fraction of positions whose most likely token is the same on both sides
    top10_overlap: int
    top10_jaccard: float
    top10_rank_agreement: float
    top10_ref: list[dict] = field(default_factory=list)
    top10_maxtext: list[dict] = field(default_factory=list)
    passed: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def brief(self) -> dict:
        """The numbers without the per-token and top-10 lists."""
        return {k: v for k, v in asdict(self).items() if k not in ("kl_per_token", "top10_ref", "top10_maxtext")}


class StreamStats:
    """One side's logits of one prompt, block by block: log-sum-exp, top-1 per position, top-10 at the last one."""

    def __init__(self, positions: int):
        self.lse = LogSumExp(positions)
        self.best = np.full(positions, -np.inf)
        self.best_id = np.zeros(positions, np.int64)
        self.last = TopK()
        self.finite = True
        self.block = self.weights = self.scale = None  # the current block, float64, and its exp(x - m)

    def update(self, block: np.ndarray, v0: int = 0) -> None:
        x = np.asarray(block, np.float64)
        self.finite &= bool(np.isfinite(x).all())
        self.block = x
        self.weights, self.scale = self.lse.update(x)
        i = x.argmax(axis=1)
        v = x[np.arange(len(i)), i]
        better = v > self.best
        self.best[better], self.best_id[better] = v[better], i[better] + v0
        self.last.update(x[-1], v0)


class PairStats:
    """KL(P_ref || Q_test), max |logit difference|, top-1 and top-10 agreement of one prompt, from two sides'
    `StreamStats` after each has taken the same block of columns (`update`)."""

    def __init__(self, ref: StreamStats, test: StreamStats):
        self.ref, self.test = ref, test
        n = len(ref.best)
        self.s1 = np.zeros(n)  # sum exp(r - m) (r - t), rescaled with the reference's maximum
        self.max_diff = np.zeros(n)

    def update(self) -> None:
        r, t = self.ref.block, self.test.block
        if r.shape != t.shape:
            raise ValueError(f"logit blocks differ in shape: {r.shape} vs {t.shape}")
        d = r - t
        self.s1 = self.s1 * self.ref.scale + (self.ref.weights * d).sum(axis=1)
        self.max_diff = np.maximum(self.max_diff, np.abs(d).max(axis=1))

    def kl(self) -> np.ndarray:
        kl = self.s1 / self.ref.lse.s - self.ref.lse.value + self.test.lse.value
        return kl if self.ref.finite and self.test.finite else np.full_like(kl, np.nan)

    def result(self, name: str, *, max_kl: float, decode=None) -> PromptMetrics:
        kl = self.kl()
        finite = bool(np.all(np.isfinite(kl)))
        cmp = compare_top_k_lists(self.ref.last.items(), self.test.last.items())

        def rows(items):
            return [{"id": i, "logit": v, **({"token": decode(i)} if decode is not None else {})} for i, v in items]

        kl_max = float(np.max(kl)) if finite else float("nan")
        return PromptMetrics(
            name=name,
            num_tokens=int(kl.shape[0]),
            kl_per_token=[float(x) for x in kl],
            kl_mean=float(np.mean(kl)),
            kl_max=kl_max,
            kl_argmax=int(np.argmax(kl)) if finite else -1,
            max_abs_logit_diff=float(np.max(self.max_diff)) if finite else float("nan"),
            top1_agreement=float(np.mean(self.ref.best_id == self.test.best_id)),
            top10_overlap=cmp.overlap,
            top10_jaccard=cmp.jaccard,
            top10_rank_agreement=cmp.rank_agreement,
            top10_ref=rows(cmp.ref),
            top10_maxtext=rows(cmp.test),
            passed=bool(kl_max <= max_kl),  # NaN compares False: a NaN KL fails
        )


def compare_logits(
    name: str, ref_logits: np.ndarray, test_logits: np.ndarray, *, max_kl: float, decode=None
) -> PromptMetrics:
    """All metrics for one prompt from two whole `[T, V*]` arrays (cut to the common vocabulary)."""
    ref, test = cut_vocab(np.asarray(ref_logits, np.float32), np.asarray(test_logits, np.float32))
    sides = StreamStats(ref.shape[0]), StreamStats(ref.shape[0])
    sides[0].update(ref)
    sides[1].update(test)
    stats = PairStats(*sides)
    stats.update()
    return stats.result(name, max_kl=max_kl, decode=decode)


def nonfinite_counts(a: np.ndarray) -> dict[str, int] | None:
    """{"nan": n, "inf": m} of an array holding NaN or Inf, None for a finite (or integer) one. One fast pass for the
    finite case: 16-bit floats (bfloat16 has no fast numpy isfinite) by their exponent bits."""
    a = np.asarray(a)
    if a.dtype.kind not in "fV" and a.dtype.name != "bfloat16":
        return None
    if a.dtype.itemsize == 2 and a.dtype != np.float16:  # bfloat16: exponent bits 14-7 all ones
        bits = a.view(np.uint16)
        if a.size == 0 or (bits & 0x7FFF).max() < 0x7F80:  # magnitude bits below the first Inf: all finite
            return None
        special = (bits & 0x7F80) == 0x7F80
        nan = int(np.count_nonzero(special & ((bits & 0x007F) != 0)))
        return {"nan": nan, "inf": int(np.count_nonzero(special)) - nan}
    if np.isfinite(a).all():
        return None
    return {"nan": int(np.count_nonzero(np.isnan(a))), "inf": int(np.count_nonzero(np.isinf(a)))}


class NonFinite:
    """NaN / Inf counts by tensor name, accumulated over the pieces a tensor is read in (each piece counted once,
    however often it is read)."""

    def __init__(self):
        self.found: dict[str, dict[str, int]] = {}
        self._seen: set = set()
        self._lock = threading.Lock()

    def scan(self, name: str, a: np.ndarray, piece=None) -> np.ndarray:
        with self._lock:
            if (name, piece) in self._seen:
                return a
            self._seen.add((name, piece))
        counts = nonfinite_counts(a)
        if counts:
            with self._lock:
                prev = self.found.setdefault(name, {"nan": 0, "inf": 0})
                prev["nan"] += counts["nan"]
                prev["inf"] += counts["inf"]
        return a


def nonfinite_weights(named_arrays) -> dict[str, dict[str, int]]:
    """`{name: {"nan": n, "inf": m}}` for every array of `(name, array)` holding NaN or Inf (others omitted)."""
    out = NonFinite()
    for i, (name, a) in enumerate(named_arrays):
        out.scan(name, a, i)
    return out.found


def describe_nonfinite(found: dict[str, dict[str, int]], limit: int = 6) -> str:
    names = sorted(found)
    parts = [f"{n} ({found[n]['nan']} NaN, {found[n]['inf']} Inf)" for n in names[:limit]]
    return ", ".join(parts) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def summarize(per_prompt: list[PromptMetrics], max_kl: float) -> dict:
    """Overall metrics: the token-weighted mean KL, the max over every position of every prompt."""
    all_kl = np.concatenate([np.asarray(m.kl_per_token, np.float64) for m in per_prompt])
    worst = max(per_prompt, key=lambda m: np.nan_to_num(m.kl_max, nan=np.inf))
    kl_max = float(np.max(all_kl)) if np.all(np.isfinite(all_kl)) else float("nan")
    return {
        "num_prompts": len(per_prompt),
        "num_tokens": int(all_kl.shape[0]),
        "kl_mean": float(np.mean(all_kl)),
        "kl_max": kl_max,
        "kl_max_prompt": worst.name,
        "max_abs_logit_diff": float(max(m.max_abs_logit_diff for m in per_prompt)),
        "top1_agreement": float(
            np.average([m.top1_agreement for m in per_prompt], weights=[m.num_tokens for m in per_prompt])
        ),
        "top10_overlap_min": int(min(m.top10_overlap for m in per_prompt)),
        "top10_jaccard_mean": float(np.mean([m.top10_jaccard for m in per_prompt])),
        "top10_rank_agreement_mean": float(np.mean([m.top10_rank_agreement for m in per_prompt])),
        "max_kl_threshold": max_kl,
        "passed": bool(kl_max <= max_kl) and all(m.passed for m in per_prompt),
    }

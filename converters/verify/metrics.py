"""Comparison metrics between reference logits (HF or a golden file) and MaxText-side logits.

All metrics are computed in float64 from the two float32 logit arrays, so the measurement itself
adds no noise at the 1e-5 KL level used for float32 verification.

KL direction: KL(P_ref || Q_maxtext) = sum_v p(v) * (log p(v) - log q(v)), per position, with the
vocabulary cut to the smaller of the two sides *before* the softmax (MaxText pads its embedding
table; the padded rows are not part of the model's distribution). Same definition as MaxText's
forward_pass_logit_checker.
"""

from __future__ import annotations

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
    """Per-position KL(P_ref || Q_test), shape [T] (float64)."""
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


def compare_top_k(ref_row: np.ndarray, test_row: np.ndarray, k: int = TOP_K) -> TopKComparison:
    v = min(ref_row.shape[-1], test_row.shape[-1])
    ref = top_k(ref_row[:v], k)
    test = top_k(test_row[:v], k)
    a, b = {i for i, _ in ref}, {i for i, _ in test}
    n = min(len(ref), len(test))
    same_rank = sum(1 for r in range(n) if ref[r][0] == test[r][0])
    return TopKComparison(
        ref=ref,
        test=test,
        overlap=len(a & b),
        jaccard=len(a & b) / len(a | b) if (a | b) else 0.0,
        rank_agreement=same_rank / n if n else 0.0,
    )


@dataclass
class PromptMetrics:
    name: str
    num_tokens: int
    kl_per_token: list[float]
    kl_mean: float
    kl_max: float
    kl_argmax: int
    max_abs_logit_diff: float
    top10_overlap: int
    top10_jaccard: float
    top10_rank_agreement: float
    top10_ref: list[dict] = field(default_factory=list)
    top10_maxtext: list[dict] = field(default_factory=list)
    passed: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def compare_logits(
    name: str,
    ref_logits: np.ndarray,
    test_logits: np.ndarray,
    *,
    max_kl: float,
    decode=None,
) -> PromptMetrics:
    """All metrics for one prompt. `decode(id) -> str` labels the top-10 tokens when available."""
    ref, test = cut_vocab(np.asarray(ref_logits, np.float32), np.asarray(test_logits, np.float32))
    kl = kl_per_token(ref, test)
    diff = np.abs(ref.astype(np.float64) - test.astype(np.float64))
    finite = bool(np.all(np.isfinite(kl))) and bool(np.all(np.isfinite(diff)))
    kl_max = float(np.max(kl)) if finite else float("nan")
    cmp = compare_top_k(ref[-1], test[-1])

    def rows(items):
        out = []
        for i, logit in items:
            row = {"id": i, "logit": logit}
            if decode is not None:
                row["token"] = decode(i)
            out.append(row)
        return out

    return PromptMetrics(
        name=name,
        num_tokens=int(ref.shape[0]),
        kl_per_token=[float(x) for x in kl],
        kl_mean=float(np.mean(kl)),
        kl_max=kl_max,
        kl_argmax=int(np.argmax(kl)) if finite else -1,
        max_abs_logit_diff=float(np.max(diff)) if finite else float("nan"),
        top10_overlap=cmp.overlap,
        top10_jaccard=cmp.jaccard,
        top10_rank_agreement=cmp.rank_agreement,
        top10_ref=rows(cmp.ref),
        top10_maxtext=rows(cmp.test),
        # NaN compares False, so a NaN KL fails the check.
        passed=bool(kl_max <= max_kl),
    )


def nonfinite_weights(named_arrays) -> dict[str, dict[str, int]]:
    """`{name: {"nan": n, "inf": m}}` for every array of `(name, array)` holding NaN or Inf (others omitted)."""
    found = {}
    for name, a in named_arrays:
        try:
            nan, inf = int(np.count_nonzero(np.isnan(a))), int(np.count_nonzero(np.isinf(a)))
        except TypeError:  # integer arrays
            continue
        if nan or inf:
            found[name] = {"nan": nan, "inf": inf}
    return found


def describe_nonfinite(found: dict[str, dict[str, int]], limit: int = 6) -> str:
    names = sorted(found)
    parts = [f"{n} ({found[n]['nan']} NaN, {found[n]['inf']} Inf)" for n in names[:limit]]
    return ", ".join(parts) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def summarize(per_prompt: list[PromptMetrics], max_kl: float) -> dict:
    """Overall metrics: the token-weighted mean KL, the max over every position of every prompt."""
    all_kl = np.concatenate([np.asarray(m.kl_per_token, np.float64) for m in per_prompt])
    worst = max(per_prompt, key=lambda m: (np.nan_to_num(m.kl_max, nan=np.inf)))
    kl_max = float(np.max(all_kl)) if np.all(np.isfinite(all_kl)) else float("nan")
    return {
        "num_prompts": len(per_prompt),
        "num_tokens": int(all_kl.shape[0]),
        "kl_mean": float(np.mean(all_kl)),
        "kl_max": kl_max,
        "kl_max_prompt": worst.name,
        "max_abs_logit_diff": float(max(m.max_abs_logit_diff for m in per_prompt)),
        "top10_overlap_min": int(min(m.top10_overlap for m in per_prompt)),
        "top10_jaccard_mean": float(np.mean([m.top10_jaccard for m in per_prompt])),
        "top10_rank_agreement_mean": float(np.mean([m.top10_rank_agreement for m in per_prompt])),
        "max_kl_threshold": max_kl,
        "passed": bool(kl_max <= max_kl) and all(m.passed for m in per_prompt),
    }

"""KL, top-k and summary metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from converters.verify.metrics import compare_logits, compare_top_k, kl_per_token, summarize, top_k


def test_kl_matches_definition():
    rng = np.random.default_rng(0)
    p_logits = rng.normal(size=(5, 7)).astype(np.float32)
    q_logits = rng.normal(size=(5, 7)).astype(np.float32)
    p = np.exp(p_logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(q_logits.astype(np.float64))
    q /= q.sum(-1, keepdims=True)
    expected = (p * np.log(p / q)).sum(-1)
    np.testing.assert_allclose(kl_per_token(p_logits, q_logits), expected, rtol=1e-10)


def test_kl_properties():
    x = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32) * 10
    np.testing.assert_allclose(kl_per_token(x, x), 0.0, atol=1e-12)
    np.testing.assert_allclose(kl_per_token(x, x + 3.0), 0.0, atol=1e-12)  # shift invariant
    assert np.all(kl_per_token(x, x[:, ::-1].copy()) > 0)
    # Two point masses at different tokens: KL = logit gap when one side is much more confident.
    a = np.array([[20.0, 0.0]], np.float32)
    b = np.array([[0.0, 0.0]], np.float32)
    assert kl_per_token(a, b)[0] == pytest.approx(math.log(2), rel=1e-6)


def test_vocab_is_cut_before_softmax():
    ref = np.array([[1.0, 2.0, 3.0]], np.float32)
    padded = np.array([[1.0, 2.0, 3.0, 50.0, 50.0]], np.float32)  # padded rows with huge logits
    assert kl_per_token(ref, padded)[0] == pytest.approx(0.0, abs=1e-12)
    m = compare_logits("p", ref, padded, max_kl=1e-6)
    assert m.passed and m.max_abs_logit_diff == 0.0


def test_top_k_and_agreement():
    row = np.array([0.1, 5.0, 3.0, 5.0, -1.0, 4.0])
    assert [i for i, _ in top_k(row, 3)] == [1, 3, 5]  # tie broken by the lower id
    ref = np.arange(20, dtype=np.float32)
    test = ref.copy()
    test[[19, 18]] = test[[18, 19]]  # swap the top two
    test[0] = 100.0  # a new token takes the lead: ranks [0, 18, 19, 17, ..., 11]
    c = compare_top_k(ref, test)
    assert c.overlap == 9  # token 10 dropped out, token 0 came in
    assert c.jaccard == pytest.approx(9 / 11)
    assert c.rank_agreement == pytest.approx(0.1)  # only rank 2 (token 18) agrees
    c = compare_top_k(ref, ref)
    assert (c.overlap, c.jaccard, c.rank_agreement) == (10, 1.0, 1.0)


def test_compare_and_summary():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(6, 30)).astype(np.float32)
    test = ref + rng.normal(scale=0.3, size=ref.shape).astype(np.float32)
    m = compare_logits("a", ref, test, max_kl=1.0, decode=lambda i: f"<{i}>")
    assert m.num_tokens == 6 and len(m.kl_per_token) == 6
    assert m.kl_max == pytest.approx(max(m.kl_per_token)) and m.kl_argmax == int(np.argmax(m.kl_per_token))
    assert m.kl_mean == pytest.approx(np.mean(m.kl_per_token))
    assert m.max_abs_logit_diff == pytest.approx(float(np.abs(ref - test).max()))
    assert m.top10_ref[0]["token"] == f"<{m.top10_ref[0]['id']}>" and len(m.top10_maxtext) == 10
    m2 = compare_logits("b", ref[:2], ref[:2], max_kl=1.0)
    s = summarize([m, m2], max_kl=1.0)
    assert s["num_tokens"] == 8 and s["kl_max"] == m.kl_max and s["kl_max_prompt"] == "a"
    assert s["kl_mean"] == pytest.approx((sum(m.kl_per_token) + sum(m2.kl_per_token)) / 8)
    assert s["passed"]
    assert not summarize([m], max_kl=m.kl_max / 2)["passed"]


def test_nan_fails():
    ref = np.zeros((2, 4), np.float32)
    bad = ref.copy()
    bad[1, 2] = np.nan
    m = compare_logits("n", ref, bad, max_kl=1.0)
    assert not m.passed and math.isnan(m.kl_max)
    assert not summarize([m], 1.0)["passed"]

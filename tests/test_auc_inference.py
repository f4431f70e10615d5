"""DeLong AUC variance, confidence interval and paired test against brute-force O(m n) references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from reclora_ds.metrics import (
    auc,
    auc_confidence_interval,
    delong_auc_variance,
    delong_paired_test,
    evaluate_predictions,
)

# ----------------------------------------------------------------------------------------------------------
# Independent references: the structural components from the full m x n kernel matrix
# ----------------------------------------------------------------------------------------------------------


def _components(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """V10 [m] and V01 [n] from psi(x_i, y_j) = 1 / 0.5 / 0 for x_i > / == / < y_j."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # [m, n]
    return psi.mean(axis=1), psi.mean(axis=0)


def brute_delong(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    v10, v01 = _components(y, s)
    return float(v10.mean()), float(np.var(v10, ddof=1) / len(v10) + np.var(v01, ddof=1) / len(v01))


def brute_paired(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float, float, float]:
    """(diff, var of diff, z, p) from the 2 x 2 covariance S = S10 / m + S01 / n and L = (1, -1)."""
    (v10a, v01a), (v10b, v01b) = _components(y, a), _components(y, b)
    s10 = np.cov(np.stack([v10a, v10b]))  # ddof=1
    s01 = np.cov(np.stack([v01a, v01b]))
    cov = s10 / len(v10a) + s01 / len(v01a)
    lvec = np.array([1.0, -1.0])
    var = float(lvec @ cov @ lvec)
    diff = float(v10a.mean() - v10b.mean())
    z = diff / math.sqrt(var) if var > 0 else math.nan
    return diff, var, z, float(2.0 * norm.sf(abs(z)))


def _data(rng: np.random.Generator, n: int, ties: bool) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.35).astype(np.float64)
    y[:2], y[2:4] = 1.0, 0.0  # both classes, at least 2 each
    s = rng.random(n) + 0.3 * y
    return y, (np.round(s, 1) if ties else s)


# ----------------------------------------------------------------------------------------------------------
# delong_auc_variance
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_variance_matches_brute_force(seed, ties):
    rng = np.random.default_rng(seed)
    y, s = _data(rng, 500, ties)
    got_auc, got_var = delong_auc_variance(y, s)
    want_auc, want_var = brute_delong(y, s)
    assert got_auc == pytest.approx(want_auc, rel=1e-12)
    assert got_auc == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    assert got_auc == pytest.approx(auc(y, s), rel=1e-15)
    assert got_var == pytest.approx(want_var, rel=1e-10)


@pytest.mark.parametrize("seed", range(20))
def test_variance_tiny_cases(seed):
    rng = np.random.default_rng(100 + seed)
    y = rng.permutation([1.0, 1.0, 0.0, 0.0, 0.0])  # 2 positives, 3 negatives
    s = rng.integers(0, 3, 5).astype(np.float64) if seed % 2 else rng.random(5)  # heavy ties / none
    got_auc, got_var = delong_auc_variance(y, s)
    want_auc, want_var = brute_delong(y, s)
    assert got_auc == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    assert got_auc == pytest.approx(want_auc, rel=1e-12)
    assert got_var == pytest.approx(want_var, rel=1e-10, abs=1e-15)


def test_variance_degenerate_inputs():
    assert all(math.isnan(v) for v in delong_auc_variance([1, 1, 1], [0.1, 0.2, 0.3]))
    assert all(math.isnan(v) for v in delong_auc_variance([0, 0], [0.1, 0.2]))
    value, var = delong_auc_variance([1, 0, 0, 0], [0.9, 0.1, 0.5, 0.95])  # one positive: no S10
    assert value == pytest.approx(2 / 3) and math.isnan(var)
    assert delong_auc_variance([1, 1, 0, 0], [0.8, 0.9, 0.1, 0.2]) == (1.0, 0.0)  # perfect separation
    assert delong_auc_variance([1, 0, 1, 0], [0.5] * 4) == (0.5, 0.0)  # all tied
    with pytest.raises(ValueError, match="differ in length"):
        delong_auc_variance([1, 0, 1], [0.1, 0.2])


def test_accepts_torch_tensors():
    rng = np.random.default_rng(7)
    y, s = _data(rng, 200, ties=True)
    assert delong_auc_variance(torch.from_numpy(y), torch.from_numpy(s).float()) == pytest.approx(
        delong_auc_variance(y, s.astype(np.float32)), rel=1e-12
    )


# ----------------------------------------------------------------------------------------------------------
# auc_confidence_interval
# ----------------------------------------------------------------------------------------------------------


def test_interval_is_wald_on_delong_se():
    rng = np.random.default_rng(3)
    y, s = _data(rng, 400, ties=True)
    ci = auc_confidence_interval(y, s)
    value, var = brute_delong(y, s)
    assert ci.auc == pytest.approx(value, rel=1e-12)
    assert ci.se == pytest.approx(math.sqrt(var), rel=1e-10)
    assert ci.low == pytest.approx(value - norm.ppf(0.975) * ci.se, rel=1e-10)
    assert ci.high == pytest.approx(value + norm.ppf(0.975) * ci.se, rel=1e-10)
    assert (ci.n, ci.n_pos, ci.n_neg) == (400, int(y.sum()), 400 - int(y.sum()))
    wide = auc_confidence_interval(y, s, level=0.99)
    assert wide.low < ci.low < ci.auc < ci.high < wide.high
    assert wide.high - wide.low == pytest.approx(2 * norm.ppf(0.995) * ci.se, rel=1e-10)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="level"):
            auc_confidence_interval(y, s, level=bad)


def test_interval_clipped_and_degenerate():
    y = np.array([1, 1, 1, 0, 0, 0], dtype=np.float64)
    ci = auc_confidence_interval(y, [0.9, 0.8, 0.3, 0.4, 0.2, 0.1])  # AUC 8/9, wide SE: high clipped
    assert ci.auc == pytest.approx(8 / 9) and ci.se > 0 and ci.auc + 1.96 * ci.se > 1
    assert ci.high == 1.0 and 0.0 <= ci.low < ci.auc
    perfect = auc_confidence_interval(y, [0.9, 0.8, 0.7, 0.3, 0.2, 0.1])
    assert (perfect.auc, perfect.low, perfect.high, perfect.se) == (1.0, 1.0, 1.0, 0.0)
    one_class = auc_confidence_interval([1, 1], [0.1, 0.2])
    assert all(math.isnan(v) for v in one_class[:4]) and one_class[4:] == (2, 2, 0)


def test_interval_coverage_binormal():
    """95% intervals cover the true AUC Phi(mu / sqrt 2) of N(mu, 1) vs N(0, 1) in ~95% of data sets."""
    rng = np.random.default_rng(2024)
    mu, n, reps = 1.0, 300, 400
    true_auc = norm.cdf(mu / math.sqrt(2.0))
    covered = 0
    for _ in range(reps):
        y = (rng.random(n) < 0.4).astype(np.float64)
        s = rng.standard_normal(n) + mu * y
        ci = auc_confidence_interval(y, s)
        covered += ci.low <= true_auc <= ci.high
    assert 0.92 <= covered / reps <= 0.98, covered / reps


# ----------------------------------------------------------------------------------------------------------
# delong_paired_test
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_paired_matches_brute_force(seed, ties):
    rng = np.random.default_rng(50 + seed)
    y, a = _data(rng, 400, ties)
    b = a + 0.3 * rng.standard_normal(len(y))  # correlated with a, weaker
    if ties:
        b = np.round(b, 1)
    t = delong_paired_test(y, a, b)
    diff, var, z, p = brute_paired(y, a, b)
    assert t.auc_a == pytest.approx(roc_auc_score(y, a), rel=1e-12)
    assert t.auc_b == pytest.approx(roc_auc_score(y, b), rel=1e-12)
    assert t.diff == pytest.approx(diff, rel=1e-10)
    assert t.se == pytest.approx(math.sqrt(var), rel=1e-10)
    assert t.z == pytest.approx(z, rel=1e-10)
    assert t.p_value == pytest.approx(p, rel=1e-8)
    assert t.n == len(y)


@pytest.mark.parametrize("seed", range(6))
def test_paired_tiny_cases(seed):
    rng = np.random.default_rng(200 + seed)
    y = rng.permutation([1.0, 1.0, 0.0, 0.0, 0.0])
    a, b = rng.integers(0, 3, 5).astype(np.float64), rng.random(5)
    diff, var, z, p = brute_paired(y, a, b)
    t = delong_paired_test(y, a, b)
    assert t.diff == pytest.approx(diff, rel=1e-12, abs=1e-15)
    assert t.se**2 == pytest.approx(var, rel=1e-10, abs=1e-15)
    if var > 1e-12:
        assert (t.z, t.p_value) == pytest.approx((z, p), rel=1e-10, abs=1e-15)


def test_paired_identical_scores():
    rng = np.random.default_rng(5)
    y, s = _data(rng, 300, ties=True)
    t = delong_paired_test(y, s, s.copy())
    assert (t.diff, t.se, t.z, t.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_clearly_better_model():
    rng = np.random.default_rng(11)
    n = 2000
    y = (rng.random(n) < 0.5).astype(np.float64)
    strong = 2.0 * y + rng.standard_normal(n)
    noise = rng.standard_normal(n)
    t = delong_paired_test(y, strong, noise)
    assert t.auc_a > 0.85 and abs(t.auc_b - 0.5) < 0.05
    assert t.z > 0 and t.p_value < 1e-6


def test_paired_swap_flips_z():
    rng = np.random.default_rng(9)
    y, a = _data(rng, 300, ties=False)
    b = np.round(a + 0.4 * rng.standard_normal(len(y)), 1)
    ab, ba = delong_paired_test(y, a, b), delong_paired_test(y, b, a)
    assert ba.z == -ab.z and ba.diff == -ab.diff and ab.z != 0
    assert ba.p_value == ab.p_value and ba.se == ab.se
    assert (ba.auc_a, ba.auc_b) == (ab.auc_b, ab.auc_a)


def test_paired_degenerate_inputs():
    t = delong_paired_test([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])  # one class
    assert all(math.isnan(v) for v in t[:6]) and t.n == 3
    # perfect model vs a constant one: both sets of components constant, zero variance, unequal AUCs
    t = delong_paired_test([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1], [0.5] * 4)
    assert (t.diff, t.se, t.z, t.p_value) == (0.5, 0.0, math.inf, 0.0)
    with pytest.raises(ValueError, match="differ in length"):
        delong_paired_test([1, 0, 1], [0.1, 0.2, 0.3], [0.1, 0.2])


# ----------------------------------------------------------------------------------------------------------
# evaluate_predictions
# ----------------------------------------------------------------------------------------------------------


def test_evaluate_predictions_has_interval():
    rng = np.random.default_rng(4)
    y, s = _data(rng, 600, ties=False)
    users = rng.integers(0, 40, len(y))
    m = evaluate_predictions(y, s, users, gather=False)
    assert set(m) == {"auc", "auc_low", "auc_high", "logloss", "gauc", "ece", "calibration", "n"}
    assert m["auc_low"] <= m["auc"] <= m["auc_high"] and m["auc_low"] < m["auc_high"]
    ci = auc_confidence_interval(y, s)
    assert (m["auc_low"], m["auc_high"]) == (ci.low, ci.high)
    assert m["auc"] == auc(y, s)

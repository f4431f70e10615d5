"""The experiment statistics against independent implementations: the paired bootstrap against a plain
loop over the same resamples with scikit-learn's AUC, DeLong's test against the O(m n) definition, the
seed statistics against numpy / scipy written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from reclora_ds.experiments.aggregate import bootstrap_aucs, paired_bootstrap, relative, seed_stats
from reclora_ds.metrics import delong_paired_test


def reference_bootstrap(labels, scores_a, scores_b, samples, seed):
    """The documented resampling, one resample at a time, AUC by scikit-learn."""
    y = np.asarray(labels) > 0.5
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng_p, rng_n = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 0])
    diffs = []
    for _ in range(samples):
        idx = np.concatenate(
            [pos[rng_p.integers(0, len(pos), len(pos))], neg[rng_n.integers(0, len(neg), len(neg))]]
        )
        a = np.mean([roc_auc_score(y[idx], s[idx]) for s in scores_a])
        b = np.mean([roc_auc_score(y[idx], s[idx]) for s in scores_b])
        diffs.append(a - b)
    diffs = np.array(diffs)
    observed = np.mean([roc_auc_score(y, s) for s in scores_a]) - np.mean(
        [roc_auc_score(y, s) for s in scores_b]
    )
    k = min((diffs <= 0).sum(), (diffs >= 0).sum()) + 1
    return observed, diffs, min(1.0, 2 * k / (samples + 1))


def brute_delong(y, a, b):
    """DeLong et al. (1988) from the definition: psi over every (positive, negative) pair."""
    y = np.asarray(y) > 0.5

    def components(s):
        sp, sn = s[y], s[~y]
        psi = (sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])
        return psi.mean(axis=1), psi.mean(axis=0), psi.mean()

    v10a, v01a, auc_a = components(a)
    v10b, v01b, auc_b = components(b)
    var = np.var(v10a - v10b, ddof=1) / y.sum() + np.var(v01a - v01b, ddof=1) / (~y).sum()
    z = (auc_a - auc_b) / math.sqrt(var)
    return auc_a - auc_b, 2 * stats.norm.sf(abs(z))


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    n = 300
    y = (rng.random(n) < 0.4).astype(np.float64)
    signal = y + rng.normal(0, 1.2, n)
    a = np.stack([signal + rng.normal(0, 0.5, n) for _ in range(2)])  # 2 seeds of a better model
    b = np.stack([0.6 * signal + rng.normal(0, 1.0, n) for _ in range(3)])  # 3 seeds of a worse one
    b[:, :40] = np.round(b[:, :40], 1)  # some tied scores
    return y, a, b


def test_vectorised_bootstrap_aucs_equal_a_loop_with_sklearn(scored):
    y, a, _ = scored
    got = bootstrap_aucs(y, a, samples=50, seed=7, block=16)  # blocks do not change the resamples
    pos, neg = np.flatnonzero(y > 0.5), np.flatnonzero(y < 0.5)
    rng_p, rng_n = np.random.default_rng([7, 1]), np.random.default_rng([7, 0])
    for b in range(50):
        idx = np.concatenate(
            [pos[rng_p.integers(0, len(pos), len(pos))], neg[rng_n.integers(0, len(neg), len(neg))]]
        )
        for k in range(len(a)):
            assert got[k, b] == pytest.approx(roc_auc_score(y[idx], a[k][idx]), abs=1e-12)


def test_paired_bootstrap_equals_the_independent_loop(scored):
    y, a, b = scored
    test = paired_bootstrap(y, a, b, samples=120, seed=5)
    observed, diffs, p = reference_bootstrap(y, a, b, 120, 5)
    assert test.diff == pytest.approx(observed, abs=1e-12)
    assert test.p_value == p
    assert (test.low, test.high) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])), abs=1e-12)
    # a model against itself: no difference, p = 1
    same = paired_bootstrap(y, a, a, samples=200, seed=1)
    assert same.diff == 0.0 and same.p_value == 1.0
    # a clearly better model against noise: the smallest p the resamples allow
    noise = np.random.default_rng(9).random((1, len(y)))
    assert paired_bootstrap(y, a, noise, samples=200, seed=1).p_value == pytest.approx(2 / 201)


def test_delong_of_the_table_equals_the_definition(scored):
    y, a, b = scored
    diff, p = brute_delong(y, a[0], b[1])
    t = delong_paired_test(y, a[0], b[1])
    assert t.diff == pytest.approx(diff, abs=1e-12) and t.p_value == pytest.approx(p, rel=1e-9)


def test_seed_statistics_and_relative_changes():
    values = [0.71, 0.74, 0.69]
    s = seed_stats(values)
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
    assert s["mean"] == pytest.approx(np.mean(values)) and s["std"] == pytest.approx(np.std(values, ddof=1))
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    one = seed_stats([0.7])
    assert one["n"] == 1 and one["mean"] == 0.7 and math.isnan(one["std"]) and math.isnan(one["ci_low"])
    # Table 3's Rel.Decr and Table 2's Rel.Impr, against the paper's printed numbers (ML-1M)
    assert relative(0.7869, 0.8141, "row_vs_reference") == pytest.approx(-0.0334, abs=5e-5)
    assert relative(0.7992, 0.8141, "reference_vs_row") == pytest.approx(0.0186, abs=5e-5)


@pytest.mark.parametrize("kind", ["bars", "line", "time"])
def test_every_plot_kind_writes_a_png(tmp_path, kind):
    from reclora_ds.experiments.aggregate import RunResult, results_rows
    from reclora_ds.experiments.plots import write_plots
    from reclora_ds.experiments.spec import parse_spec

    spec = parse_spec({
        "name": "p", "base": "x.yaml", "reference": "a", "plot": {"kind": kind, "x_label": "N_m", "log_x": True},
        "metrics": ["auc", "train_s_per_sample", "infer_s_per_sample"],
        "significance": {"bootstrap_samples": 100},
        "variants": [{"name": n, "mode": "plora", "x": x, "series": s}
                     for n, x, s in (("a", 1, "A"), ("b", 2, "A"), ("c", 1, "B"), ("d", 2, "B"))],
    })  # fmt: skip
    rng = np.random.default_rng(0)
    y = (rng.random(80) < 0.5).astype(float)
    runs = [
        RunResult(v, seed, np.arange(80), y, rng.random(80),
                  {"auc": 0.6 + 0.01 * seed, "logloss": 0.6, "gauc": 0.5, "train_s_per_sample": 1.0 + seed,
                   "infer_s_per_sample": 0.2, "n": 80}, "")
        for v in "abcd" for seed in (1, 2)
    ]  # fmt: skip
    rows = results_rows(spec, runs)
    assert [r["variant"] for r in rows] == list("abcd")
    assert math.isnan(rows[0]["p_bootstrap"]) and all(0 < r["p_bootstrap"] <= 1 for r in rows[1:])
    (path,) = write_plots(spec, rows, tmp_path)
    assert path.stat().st_size > 10_000

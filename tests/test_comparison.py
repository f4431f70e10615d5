"""Model comparison on the same samples (reclora_ds.comparison) against sklearn and the metrics module."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from reclora_ds.comparison import compare_on_same_samples, markdown_table
from reclora_ds.metrics import delong_paired_test


def test_rows_hold_each_models_auc_interval_and_paired_test_against_the_reference():
    rng = np.random.default_rng(0)
    y = (rng.random(3000) < 0.4).astype(float)
    signal = y + rng.standard_normal(3000)
    probs = {
        "ref": 1 / (1 + np.exp(-signal)),
        "noise": rng.random(3000),
        "same": 1 / (1 + np.exp(-signal)),
    }
    rows = {r["model"]: r for r in compare_on_same_samples(y, probs, "ref")}
    for name, p in probs.items():
        assert rows[name]["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert rows[name]["auc_low"] < rows[name]["auc"] < rows[name]["auc_high"]
        assert rows[name]["logloss"] == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)), abs=1e-9)
    assert "vs" not in rows["ref"]
    test = delong_paired_test(y, probs["noise"], probs["ref"])
    assert rows["noise"]["p_value"] == test.p_value < 1e-12 and rows["noise"]["diff"] == test.diff < 0
    assert rows["noise"]["rel_improvement"] == pytest.approx(test.diff / rows["ref"]["auc"])
    assert rows["same"]["p_value"] == 1.0
    table = markdown_table(list(rows.values()))
    assert "| noise |" in table and "worse (alpha 0.05)" in table and "within noise" in table


def test_refuses_models_on_other_samples_or_an_unknown_reference():
    with pytest.raises(ValueError, match="3 predictions for 4 samples"):
        compare_on_same_samples(np.array([0, 1, 0, 1]), {"a": np.ones(4), "b": np.ones(3)}, "a")
    with pytest.raises(ValueError, match="reference 'c'"):
        compare_on_same_samples(np.array([0, 1]), {"a": np.ones(2)}, "c")

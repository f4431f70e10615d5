"""Compare models on the same samples: AUC with its 95% interval, log loss, and paired tests against a reference.

Models are only compared on the same sample ids (:func:`compare_on_same_samples` refuses anything else). For
each model the table gives ``n``, AUC and its DeLong 95% interval, log loss; for every model but the
reference, the AUC difference to the reference, its standard error and the two-sided p-value of DeLong's
paired test (the two AUCs are correlated: same samples, same labels), and the relative improvement
``(auc - auc_ref) / auc_ref``. A difference whose p-value is above the chosen level is within noise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from reclora_ds.metrics import auc_confidence_interval, delong_paired_test, log_loss


def compare_on_same_samples(
    labels: np.ndarray,
    probs: Mapping[str, np.ndarray],
    reference: str,
) -> list[dict[str, Any]]:
    """One row per model, in the mapping's order (see the module docstring for the columns).

    Args:
        labels: float [n] 0/1 labels of the samples.
        probs: model name -> float [n] predicted probabilities of the same samples, in the same order.
        reference: the model the others are tested against (a key of ``probs``).
    """
    if reference not in probs:
        raise ValueError(f"reference {reference!r} is not one of the models {list(probs)}")
    y = np.asarray(labels, dtype=np.float64)
    for name, p in probs.items():
        if len(p) != len(y):
            raise ValueError(f"{name}: {len(p)} predictions for {len(y)} samples")
    rows = []
    for name, p in probs.items():
        ci = auc_confidence_interval(y, p)
        row: dict[str, Any] = {
            "model": name,
            "n": ci.n,
            "auc": ci.auc,
            "auc_low": ci.low,
            "auc_high": ci.high,
            "logloss": log_loss(y, p),
        }
        if name != reference:
            test = delong_paired_test(y, p, probs[reference])
            row |= {
                "vs": reference,
                "diff": test.diff,
                "diff_se": test.se,
                "p_value": test.p_value,
                "rel_improvement": test.diff / test.auc_b,
            }
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]], alpha: float = 0.05) -> str:
    """The rows of :func:`compare_on_same_samples` as a Markdown table with a verdict column."""
    lines = [
        "| model | n | AUC | AUC 95% CI | log loss | vs | ΔAUC | p (DeLong, paired) | verdict |",
        "|---|---:|---:|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        if "vs" in r:
            verdict = "within noise" if not r["p_value"] < alpha else ("better" if r["diff"] > 0 else "worse")
            tail = f"{r['vs']} | {r['diff']:+.4f} | {r['p_value']:.2g} | {verdict} (alpha {alpha})"
        else:
            tail = "(reference) | | | "
        lines.append(
            f"| {r['model']} | {r['n']} | {r['auc']:.4f} | [{r['auc_low']:.4f}, {r['auc_high']:.4f}] | "
            f"{r['logloss']:.4f} | {tail} |"
        )
    return "\n".join(lines)

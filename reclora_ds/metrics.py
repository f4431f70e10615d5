"""Evaluation metrics computed exactly over a whole split, across ranks; gate statistics.

AUC is not decomposable: the mean of per-rank (or per-batch) AUCs is not the AUC of the split. So every
rank's predictions are gathered (:func:`gather_predictions`), de-duplicated by ``sample_id`` (a padded
distributed loader repeats a few samples so that ranks run the same number of steps) and the metrics are
computed once on the union (:func:`evaluate_predictions`).

Inference on the AUC uses DeLong's (1988) structural components, computed in O(n log n) with midranks
(Sun & Xu 2014): :func:`delong_auc_variance`, a Wald interval (:func:`auc_confidence_interval`) and the
paired test of two models scored on the same samples (:func:`delong_paired_test`).

All metric functions take numpy arrays (or anything ``np.asarray`` accepts), work in float64 and are
vectorised (sorts and bincounts, no Python loop over samples or users).

Shape legend: n samples, B batch, N experts.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np
import torch

from reclora_ds.distributed import all_gather_variable, is_distributed

LOGLOSS_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before the log


def _as_1d(x: Any, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    out = np.asarray(x, dtype=dtype)
    if out.ndim != 1:
        out = out.reshape(-1)
    return out


def _average_ranks(sorted_values: np.ndarray, breaks: np.ndarray | None = None) -> np.ndarray:
    """1-based ranks of already sorted values, ties sharing the average of their ranks.

    ``breaks`` (bool [n]) may force extra group starts (e.g. where the user changes), so ties never
    span two groups.
    """
    n = len(sorted_values)
    new_group = np.empty(n, dtype=bool)
    new_group[:1] = True
    new_group[1:] = sorted_values[1:] != sorted_values[:-1]
    if breaks is not None:
        new_group |= breaks
    starts = np.flatnonzero(new_group)  # first position of each tie group
    ends = np.append(starts[1:], n)  # one past its last position
    # positions start..end-1 have ranks start+1..end: their average is (start + 1 + end) / 2
    return np.repeat((starts + 1 + ends) / 2.0, ends - starts)


def auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney U) statistic, ties as average ranks.

    Equal to ``sklearn.metrics.roc_auc_score``; ``nan`` when only one class is present.
    """
    y = _as_1d(labels, np.float64) > 0.5
    s = _as_1d(scores, np.float64)
    if len(y) != len(s):
        raise ValueError(f"labels ({len(y)}) and scores ({len(s)}) differ in length")
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="stable")
    ranks = _average_ranks(s[order])
    rank_sum = ranks[y[order]].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` (any order), ties sharing the average of their ranks."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = _average_ranks(values[order])
    return ranks


def _delong_components(
    labels: Any, scores: list[Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AUCs and DeLong structural components of ``k`` score vectors on the same samples.

    With m positives X, n negatives Y and ``psi(x, y) = 1 if x > y, 1/2 if x == y, 0 otherwise``:
    ``V10(x_i) = (1/n) sum_j psi(x_i, y_j)`` and ``V01(y_j) = (1/m) sum_i psi(x_i, y_j)``. Sun & Xu (2014)
    get them from midranks: with T_z the midrank of a sample among all m + n samples, T_x among the
    positives only and T_y among the negatives only, ``T_z - T_x`` (positive) counts the negatives below it,
    ties as 1/2, and ``T_z - T_y`` (negative) the positives below it, so

        V10(x_i) = (T_z(x_i) - T_x(x_i)) / n,     V01(y_j) = 1 - (T_z(y_j) - T_y(y_j)) / m,

    three sorts instead of m x n comparisons. AUC = mean V10 = mean V01 (computed as in :func:`auc`).

    Returns:
        ``(y, auc [k], v10 [k, m], v01 [k, n])``; ``auc`` is ``nan`` and ``v10``/``v01`` are empty
        when one class is missing.
    """
    y = _as_1d(labels, np.float64) > 0.5
    parts = [_as_1d(x, np.float64) for x in scores]
    if any(len(x) != len(y) for x in parts):
        raise ValueError(f"labels ({len(y)}) and scores ({[len(x) for x in parts]}) differ in length")
    s = np.stack(parts)  # [k, n_samples]
    k = len(s)
    m = int(y.sum())
    n = len(y) - m
    if m == 0 or n == 0:
        return y, np.full(k, math.nan), np.empty((k, m)), np.empty((k, n))
    aucs = np.empty(k, dtype=np.float64)
    v10 = np.empty((k, m), dtype=np.float64)
    v01 = np.empty((k, n), dtype=np.float64)
    for r in range(k):  # one pass per model (k = 1 or 2), each vectorised over the samples
        order = np.argsort(s[r], kind="stable")
        ranks_sorted = _average_ranks(s[r, order])
        aucs[r] = (ranks_sorted[y[order]].sum() - m * (m + 1) / 2.0) / (m * n)
        tz = np.empty(len(y), dtype=np.float64)
        tz[order] = ranks_sorted
        v10[r] = (tz[y] - _midranks(s[r, y])) / n
        v01[r] = 1.0 - (tz[~y] - _midranks(s[r, ~y])) / m
    return y, aucs, v10, v01


def _delong_var(v10: np.ndarray, v01: np.ndarray) -> float:
    """``S10 / m + S01 / n`` with S the sample variances (ddof=1) of the components; nan below 2 per class."""
    m, n = len(v10), len(v01)
    if m < 2 or n < 2:
        return math.nan
    return float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)


def delong_auc_variance(labels: Any, scores: Any) -> tuple[float, float]:
    """The AUC and DeLong's (1988) estimate of its variance, in O(n log n) (Sun & Xu 2014).

    With the structural components of :func:`_delong_components` (ties count 1/2, as in :func:`auc`)
    over m positives and n negatives,

        Var(AUC) = S10 / m + S01 / n,   S10 = sum_i (V10(x_i) - AUC)^2 / (m - 1),
                                        S01 = sum_j (V01(y_j) - AUC)^2 / (n - 1).

    Returns:
        ``(auc, variance)``; ``(nan, nan)`` with one class only, and a ``nan`` variance when a class has
        a single sample (its sample variance is undefined).
    """
    _, aucs, v10, v01 = _delong_components(labels, [scores])
    if math.isnan(aucs[0]):
        return math.nan, math.nan
    return float(aucs[0]), _delong_var(v10[0], v01[0])


class AUCInterval(NamedTuple):
    """AUC with a DeLong (Wald) confidence interval (:func:`auc_confidence_interval`)."""

    auc: float
    low: float
    high: float
    se: float  # DeLong standard error
    n: int
    n_pos: int
    n_neg: int


def auc_confidence_interval(labels: Any, scores: Any, level: float = 0.95) -> AUCInterval:
    """Normal (Wald) interval ``AUC -/+ z_{(1+level)/2} * SE`` with the DeLong standard error, clipped to [0, 1].

    ``SE = sqrt(Var(AUC))`` of :func:`delong_auc_variance`. ``low``, ``high`` and ``se`` are ``nan`` when
    the variance is (one class, or a class with one sample); a perfectly separating score has ``se = 0``
    and a zero-width interval at 1.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    y = _as_1d(labels, np.float64) > 0.5
    value, var = delong_auc_variance(y, scores)
    n_pos = int(y.sum())
    se = math.sqrt(var) if var >= 0.0 else math.nan  # nan >= 0 is False
    if math.isnan(se):
        low = high = math.nan
    else:
        half = NormalDist().inv_cdf(0.5 + level / 2.0) * se
        low, high = max(0.0, value - half), min(1.0, value + half)
    return AUCInterval(value, low, high, se, len(y), n_pos, len(y) - n_pos)


class PairedAUCTest(NamedTuple):
    """DeLong's test of two correlated AUCs (:func:`delong_paired_test`)."""

    auc_a: float
    auc_b: float
    diff: float  # auc_a - auc_b
    se: float  # standard error of the difference
    z: float
    p_value: float  # two-sided
    n: int


def delong_paired_test(labels: Any, scores_a: Any, scores_b: Any) -> PairedAUCTest:
    """DeLong, DeLong & Clarke-Pearson (1988) test of ``AUC_a = AUC_b`` for two models on the same samples.

    With S10 and S01 the 2 x 2 sample covariance matrices (ddof=1) of the two models' structural
    components V10 (over the m positives) and V01 (over the n negatives), ``S = S10 / m + S01 / n`` and
    ``L = (1, -1)``:

        Var(AUC_a - AUC_b) = L S L^T,   z = (AUC_a - AUC_b) / sqrt(L S L^T),   p = 2 (1 - Phi(|z|)),

    ``L S L^T`` being computed as the variance of the component differences ``V_a - V_b`` (the same
    number, exactly 0 for identical scores). A zero variance gives ``z = 0, p = 1`` when the AUCs are
    equal (e.g. identical scores) and ``z = +/-inf, p = 0`` otherwise (each model's components are then
    constant, as for a perfect model against a constant one). ``nan`` z and p when the variance is
    undefined (a class with fewer than 2 samples).
    """
    y, aucs, v10, v01 = _delong_components(labels, [scores_a, scores_b])
    diff = float(aucs[0] - aucs[1])
    var = _delong_var(v10[0] - v10[1], v01[0] - v01[1]) if v10.shape[1] and v01.shape[1] else math.nan
    se = math.sqrt(var) if var >= 0.0 else math.nan
    if math.isnan(se):
        z = p = math.nan
    elif se == 0.0:
        z, p = (0.0, 1.0) if diff == 0.0 else (math.copysign(math.inf, diff), 0.0)
    else:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2.0))  # = 2 (1 - Phi(|z|)), accurate in the far tail
    return PairedAUCTest(float(aucs[0]), float(aucs[1]), diff, se, z, p, len(y))


def log_loss(labels: Any, probs: Any, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy of probabilities clipped to ``[eps, 1 - eps]``."""
    y = _as_1d(labels, np.float64)
    p = np.clip(_as_1d(probs, np.float64), eps, 1.0 - eps)
    if len(y) != len(p):
        raise ValueError(f"labels ({len(y)}) and probs ({len(p)}) differ in length")
    if len(y) == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def group_auc(users: Any, labels: Any, scores: Any) -> float:
    """GAUC (DIN paper): per-user AUC weighted by the user's number of samples.

    Only users with both a positive and a negative sample count (in the sum and in the weights);
    ``nan`` when there is none. Ties inside a user are average ranks, as in :func:`auc`.
    """
    u = _as_1d(users, np.int64)
    y = _as_1d(labels, np.float64) > 0.5
    s = _as_1d(scores, np.float64)
    if not len(u) == len(y) == len(s):
        raise ValueError(f"users ({len(u)}), labels ({len(y)}) and scores ({len(s)}) differ in length")
    if len(u) == 0:
        return math.nan
    _, code = np.unique(u, return_inverse=True)
    code = code.reshape(-1)
    order = np.lexsort((s, code))  # by user, then by score
    code_o, s_o, y_o = code[order], s[order], y[order]
    user_start = np.empty(len(code_o), dtype=bool)
    user_start[:1] = True
    user_start[1:] = code_o[1:] != code_o[:-1]
    ranks = _average_ranks(s_o, breaks=user_start)  # global positions, ties within a user averaged
    first = np.flatnonzero(user_start)  # each user's first position
    ranks -= np.repeat(first, np.diff(np.append(first, len(code_o))))  # -> ranks within the user
    n_users = len(first)
    n = np.bincount(code_o, minlength=n_users).astype(np.float64)
    n_pos = np.bincount(code_o, weights=y_o, minlength=n_users)
    n_neg = n - n_pos
    rank_sum = np.bincount(code_o, weights=ranks * y_o, minlength=n_users)
    ok = (n_pos > 0) & (n_neg > 0)
    if not ok.any():
        return math.nan
    user_auc = (rank_sum[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2.0) / (n_pos[ok] * n_neg[ok])
    return float(np.sum(n[ok] * user_auc) / np.sum(n[ok]))


def expected_calibration_error(labels: Any, probs: Any, n_bins: int = 15) -> float:
    """ECE = sum over bins of (bin share) x |observed positive rate - mean predicted probability|.

    ``n_bins`` equal-width bins on [0, 1]: bin k holds ``k/n_bins <= p < (k+1)/n_bins`` (the last one
    includes 1.0); empty bins contribute nothing.
    """
    y = _as_1d(labels, np.float64)
    p = _as_1d(probs, np.float64)
    if len(y) != len(p):
        raise ValueError(f"labels ({len(y)}) and probs ({len(p)}) differ in length")
    if len(y) == 0:
        return math.nan
    bins = np.clip((p * n_bins).astype(np.int64), 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.bincount(bins, weights=y, minlength=n_bins) - np.bincount(bins, weights=p, minlength=n_bins)
    # sum_k n_k/N * |sum_y_k/n_k - sum_p_k/n_k| = sum_k |sum_y_k - sum_p_k| / N
    return float(np.abs(gap[count > 0]).sum() / len(y))


def calibration_ratio(labels: Any, probs: Any) -> float:
    """Mean predicted probability / observed positive rate (1 = calibrated on average; nan without positives)."""
    y = _as_1d(labels, np.float64)
    p = _as_1d(probs, np.float64)
    if len(y) == 0 or y.sum() == 0:
        return math.nan
    return float(p.mean() / y.mean())


class Predictions(NamedTuple):
    """One prediction per sample (numpy, sorted by sample_id after :func:`gather_predictions`)."""

    labels: np.ndarray  # float64 [n]
    probs: np.ndarray  # float64 [n]
    users: np.ndarray  # int64 [n]
    sample_ids: np.ndarray  # int64 [n]


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.reshape(-1).to(device="cpu", dtype=dtype)


def _stack_predictions(
    labels: Any, probs: Any, users: Any, sample_ids: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    floats = torch.stack(
        [_as_tensor(labels, torch.float64), _as_tensor(probs, torch.float64)], dim=1
    )  # [n, 2]
    ints = torch.stack([_as_tensor(users, torch.int64), _as_tensor(sample_ids, torch.int64)], dim=1)  # [n, 2]
    if floats.shape[0] != ints.shape[0]:
        raise ValueError("labels, probs, users and sample_ids must have the same length")
    return floats, ints


def _dedup(floats: np.ndarray, ints: np.ndarray) -> Predictions:
    """One row per sample_id (its first occurrence), sorted by sample_id."""
    ids = ints[:, 1]
    uniq, first = np.unique(ids, return_index=True)
    if len(uniq) != len(ids):
        _, inverse = np.unique(ids, return_inverse=True)
        if np.any(floats[:, 0] != floats[first[inverse.reshape(-1)], 0]):
            raise ValueError("the same sample_id was gathered with different labels")
    return Predictions(
        labels=floats[first, 0], probs=floats[first, 1], users=ints[first, 0], sample_ids=ids[first]
    )


def gather_predictions(labels: Any, probs: Any, users: Any, sample_ids: Any) -> Predictions:
    """Every rank's predictions on every rank, one per ``sample_id`` (sorted by it).

    Each rank passes what it predicted (any lengths). Parts are all-gathered in rank order with
    :func:`~reclora_ds.distributed.all_gather_variable`; a sample seen more than once (padding of a
    distributed loader) is kept once, its first occurrence. Repeats with different labels mean the
    inputs are inconsistent and raise. Works without a process group (de-duplication only).
    """
    floats, ints = _stack_predictions(labels, probs, users, sample_ids)
    return _dedup(all_gather_variable(floats).numpy(), all_gather_variable(ints).numpy())


def evaluate_predictions(
    labels: Any,
    probs: Any,
    users: Any,
    sample_ids: Any | None = None,
    *,
    gather: bool = True,
    n_bins: int = 15,
) -> dict[str, float]:
    """AUC, log loss, GAUC, ECE, calibration ratio and count over the union of every rank's predictions.

    With ``gather`` (default) the predictions of all ranks are gathered and de-duplicated by
    ``sample_id`` (:func:`gather_predictions`), and every rank returns the same numbers; inside a
    multi-rank job this needs ``sample_ids``. ``gather=False`` evaluates this rank's predictions alone
    (still de-duplicated when ``sample_ids`` are given).

    Returns:
        ``{"auc", "auc_low", "auc_high", "logloss", "gauc", "ece", "calibration", "n"}``, ``auc_low`` and
        ``auc_high`` bounding the 95% DeLong interval (:func:`auc_confidence_interval`); prefix them
        (``eval/auc``) to log.
    """
    if sample_ids is not None:
        if gather:
            pred = gather_predictions(labels, probs, users, sample_ids)
        else:
            floats, ints = _stack_predictions(labels, probs, users, sample_ids)
            pred = _dedup(floats.numpy(), ints.numpy())
        labels, probs, users = pred.labels, pred.probs, pred.users
    elif gather and is_distributed():
        raise ValueError("evaluate_predictions across ranks needs sample_ids (or pass gather=False)")
    y = _as_1d(labels, np.float64)
    p = _as_1d(probs, np.float64)
    interval = auc_confidence_interval(y, p)
    return {
        "auc": auc(y, p),
        "auc_low": interval.low,
        "auc_high": interval.high,
        "logloss": log_loss(y, p),
        "gauc": group_auc(users, y, p),
        "ece": expected_calibration_error(y, p, n_bins),
        "calibration": calibration_ratio(y, p),
        "n": len(y),
    }


def gate_entropy(alpha: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the entropy (nats) of each sample's gate weights, ``0 log 0 = 0``.

    ``alpha`` [B, N] rows are distributions over N experts; the result is a detached scalar between 0
    (one expert per sample) and ``log N`` (uniform mixing).
    """
    a = alpha.detach().float()
    return -(torch.xlogy(a, a).sum(dim=-1)).mean()


def expert_usage(alpha: torch.Tensor) -> torch.Tensor:
    """Mean weight of each expert over the batch: ``alpha`` [B, N] -> [N] (sums to 1)."""
    return alpha.detach().float().mean(dim=0)

"""An experiment's results: per-run metrics recomputed from predictions, seed statistics, significance.

Per run (variant x seed) on the evaluated ids of ``spec.split``: AUC, log loss and group AUC recomputed
from ``predictions_<split>.parquet`` (stage-2 rows) or from the CRM's outputs on the same ids (CRM rows,
:func:`reclora_ds.training.crm_states.compute_crm_outputs`); stage 2's seconds per sample from
``metrics.json: perf``. Per variant, over its n seeds:

    mean, std (ddof 1), 95% CI = mean -/+ t_{0.975, n-1} std / sqrt(n)         (no CI for n = 1)
    Rel. = (mean - mean_ref) / mean_ref      (relative: row_vs_reference, Table 3's Rel.Decr, Table 4)
         = (mean_ref - mean) / mean          (relative: reference_vs_row, Table 2's Rel.Impr of RecLoRA)

Significance against the reference row on the same ids (:func:`paired_bootstrap`): the statistic is the
difference of seed-mean AUCs, ``D = mean_s AUC(row_s) - mean_s AUC(ref_s)``, resampled by a paired,
class-stratified bootstrap over the evaluated ids (the same resamples for both rows and all their seeds),
so it accounts for the test sample's noise of the number the table shows; ``p_delong_max`` is the largest
per-seed DeLong p (:func:`reclora_ds.metrics.delong_paired_test`) over the seeds both rows ran.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from reclora_ds.experiments.plan import Cell, ExperimentPlan
from reclora_ds.experiments.spec import ExperimentSpec
from reclora_ds.metrics import auc as exact_auc
from reclora_ds.metrics import delong_paired_test, evaluate_predictions

PREDICTIONS = "predictions_{split}.parquet"


@dataclasses.dataclass
class RunResult:
    """One variant x seed, evaluated on ``ids`` (ascending)."""

    variant: str
    seed: int
    ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # float64 [n], 0/1
    probs: np.ndarray  # float64 [n]
    metrics: dict[str, float]
    folder: str


class BootstrapTest(NamedTuple):
    diff: float  # observed mean_s AUC(a_s) - mean_s AUC(b_s)
    low: float  # 2.5% / 97.5% percentiles of the resampled differences
    high: float
    p_value: float  # two-sided
    samples: int


def bootstrap_aucs(
    labels: np.ndarray, scores: np.ndarray, samples: int, seed: int, block: int = 64
) -> np.ndarray:
    """AUCs of every score row on the same class-stratified bootstrap resamples: ``[S, samples]``.

    ``labels`` [n] (0/1), ``scores`` [S, n]. With P and N the positions of the positives and the negatives
    (ascending), resample b draws ``P[rng_p.integers(0, |P|, |P|)]`` and ``N[rng_n.integers(0, |N|, |N|)]``,
    ``rng_p = default_rng([seed, 1])``, ``rng_n = default_rng([seed, 0])``, resample after resample. With
    ``c_i`` the times positive i is drawn and ``c_j`` negative j:

        AUC_b = sum_i c_i (sum_j c_j ([s_i > s_j] + 0.5 [s_i = s_j])) / (|P| |N|)

    computed from the negatives' sorted scores and cumulative draw counts ([b, |N|] per block).
    """
    y = np.asarray(labels) > 0.5
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    n_pos, n_neg = len(pos), len(neg)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the bootstrap needs both classes among the evaluated ids")
    rng_p, rng_n = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 0])
    order = [np.argsort(s[neg], kind="stable") for s in scores]
    sorted_neg = [s[neg][o] for s, o in zip(scores, order)]
    left = [np.searchsorted(sn, s[pos], "left") for s, sn in zip(scores, sorted_neg)]
    right = [np.searchsorted(sn, s[pos], "right") for s, sn in zip(scores, sorted_neg)]
    out = np.empty((len(scores), samples))
    for start in range(0, samples, block):
        b = min(block, samples - start)
        rows = np.arange(b)[:, None]
        cpos = np.bincount((rng_p.integers(0, n_pos, (b, n_pos)) + rows * n_pos).ravel(), minlength=b * n_pos)
        cneg = np.bincount((rng_n.integers(0, n_neg, (b, n_neg)) + rows * n_neg).ravel(), minlength=b * n_neg)
        cpos, cneg = cpos.reshape(b, n_pos), cneg.reshape(b, n_neg)
        for k in range(len(scores)):
            cum = np.zeros((b, n_neg + 1))
            np.cumsum(cneg[:, order[k]], axis=1, out=cum[:, 1:])  # draws of the negatives below a rank
            less = cum[:, left[k]]  # [b, n_pos]: drawn negatives scored strictly lower
            ties = cum[:, right[k]] - less
            out[k, start : start + b] = (cpos * (less + 0.5 * ties)).sum(axis=1) / (n_pos * n_neg)
    return out


def paired_bootstrap(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, samples: int = 2000, seed: int = 0
) -> BootstrapTest:
    """Paired bootstrap test of ``mean_s AUC(a_s) = mean_s AUC(b_s)`` on the same ids.

    ``scores_a`` [S_a, n], ``scores_b`` [S_b, n] (the seeds of two rows). With d_b the resampled
    differences (:func:`bootstrap_aucs`, the same resamples for every row):

        p = min(1, 2 min(1 + #{d_b <= 0}, 1 + #{d_b >= 0}) / (samples + 1))
    """
    a, b = np.atleast_2d(scores_a), np.atleast_2d(scores_b)
    boot = bootstrap_aucs(labels, np.concatenate([a, b]), samples, seed)
    d = boot[: len(a)].mean(axis=0) - boot[len(a) :].mean(axis=0)
    observed = float(np.mean([exact_auc(labels, s) for s in a]) - np.mean([exact_auc(labels, s) for s in b]))
    below, above = int((d <= 0).sum()), int((d >= 0).sum())
    p = min(1.0, 2.0 * min(1 + below, 1 + above) / (samples + 1))
    low, high = np.percentile(d, [2.5, 97.5])
    return BootstrapTest(observed, float(low), float(high), p, samples)


def seed_stats(values: list[float]) -> dict[str, float]:
    """mean, std (ddof 1), n and the t-based 95% CI of the mean over seeds (nan where undefined)."""
    from scipy.stats import t

    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    n = len(v)
    mean = float(v.mean()) if n else math.nan
    std = float(v.std(ddof=1)) if n > 1 else math.nan
    half = float(t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": mean, "std": std, "n": n, "ci_low": mean - half, "ci_high": mean + half}


def relative(value: float, ref: float, how: str) -> float:
    """Relative change of a row against the reference (see the module docstring)."""
    if how == "row_vs_reference":
        return (value - ref) / ref if ref else math.nan
    return (ref - value) / value if value else math.nan


# ----------------------------------------------------------------------------------------------------------
# Reading the runs
# ----------------------------------------------------------------------------------------------------------


def _read_predictions(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    path = folder / PREDICTIONS.format(split=split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: did this run evaluate the {split} split?")
    pred = pq.read_table(path).to_pandas().sort_values("sample_id", kind="stable")
    return (
        pred["sample_id"].to_numpy(np.int64),
        pred["label"].to_numpy(np.float64),
        pred["p"].to_numpy(np.float64),
        pred["user_index"].to_numpy(np.int64),
    )


def _upstream(plan: ExperimentPlan, cell: Cell, stage: str) -> Path:
    return next(plan.units[k].folder for k in cell.units if plan.units[k].planned.stage.name == stage)


def _crm_run(plan: ExperimentPlan, cell: Cell, ids: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """The CRM row of ``cell`` on ``ids`` (None: the whole split): ids, labels, probs, users."""
    from reclora_ds.data.loader import split_sample_ids
    from reclora_ds.data.processed import ProcessedDataset
    from reclora_ds.training.crm_states import compute_crm_outputs

    split = plan.spec.split
    ds = ProcessedDataset(_upstream(plan, cell, "prepare"))
    ids = split_sample_ids(ds, split) if ids is None else ids
    got, _, logits = compute_crm_outputs(plan.unit(cell).folder, ds, sample_ids=ids)
    if not np.array_equal(got, ids):
        raise RuntimeError(f"{cell.label}: the CRM scored other samples than asked")
    table = ds.read_split(split, ["sample_id", "label", "user_index"])
    all_ids = table.column("sample_id").to_numpy()
    order = np.argsort(all_ids)
    where = order[np.searchsorted(all_ids, ids, sorter=order)]
    if not np.array_equal(all_ids[where], ids):
        raise RuntimeError(f"{cell.label}: evaluated ids missing from the {split} split")
    labels = table.column("label").to_numpy()[where].astype(np.float64)
    users = table.column("user_index").to_numpy()[where].astype(np.int64)
    return ids, labels, 1.0 / (1.0 + np.exp(-logits.astype(np.float64))), users


def collect_runs(plan: ExperimentPlan) -> list[RunResult]:
    """Every variant x seed's predictions and metrics (CRM rows on the stage-2 rows' evaluated ids)."""
    split = plan.spec.split
    stage2 = [c for c in plan.cells if c.variant.mode != "crm"]
    eval_ids = _read_predictions(plan.unit(stage2[0]).folder, split)[0] if stage2 else None
    out = []
    for cell in plan.cells:
        folder = plan.unit(cell).folder
        if cell.variant.mode == "crm":
            ids, labels, probs, users = _crm_run(plan, cell, eval_ids)
            times = {}
        else:
            ids, labels, probs, users = _read_predictions(folder, split)
            perf = json.loads((folder / "metrics.json").read_text()).get("perf", {})
            times = {
                "train_s_per_sample": float(perf.get("train_s_per_sample", math.nan)),
                "infer_s_per_sample": float(perf.get(f"eval_s_per_sample_{split}", math.nan)),
            }
        m = evaluate_predictions(labels, probs, users, gather=False)
        metrics = {"auc": float(m["auc"]), "logloss": float(m["logloss"]), "gauc": float(m["gauc"]),
                   "train_s_per_sample": math.nan, "infer_s_per_sample": math.nan, **times, "n": len(ids)}  # fmt: skip
        out.append(RunResult(cell.variant.name, cell.seed, ids, labels, probs, metrics, str(folder)))
    return out


# ----------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------


def results_rows(spec: ExperimentSpec, runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per variant (spec order): seed statistics of every metric, Rel., significance vs reference."""
    by_variant = {v.name: [r for r in runs if r.variant == v.name] for v in spec.variants}
    ref_runs = by_variant[spec.reference]
    stats = {
        name: {m: seed_stats([r.metrics[m] for r in rs]) for m in spec.metrics}
        for name, rs in by_variant.items()
    }
    rows = []
    for v in spec.variants:
        rs = by_variant[v.name]
        row: dict[str, Any] = {
            "variant": v.name, "label": v.display, "mode": v.mode, "x": v.x if v.x is not None else "",
            "series": v.series, "seeds": len(rs), "n_test": rs[0].metrics["n"],
        }  # fmt: skip
        for m in spec.metrics:
            s = stats[v.name][m]
            row.update({f"{m}_mean": s["mean"], f"{m}_std": s["std"], f"{m}_ci_low": s["ci_low"],
                        f"{m}_ci_high": s["ci_high"],
                        f"{m}_rel": relative(s["mean"], stats[spec.reference][m]["mean"], spec.relative)})  # fmt: skip
        row.update(significance(spec, rs, ref_runs) if v.name != spec.reference else
                   {"auc_diff": 0.0, "diff_low": math.nan, "diff_high": math.nan, "p_bootstrap": math.nan,
                    "p_delong_max": math.nan, "significant": ""})  # fmt: skip
        rows.append(row)
    return rows


def significance(spec: ExperimentSpec, runs: list[RunResult], ref_runs: list[RunResult]) -> dict[str, Any]:
    """Paired bootstrap and per-seed DeLong of a row against the reference (nan when ids differ)."""
    ids = ref_runs[0].ids
    if any(not np.array_equal(r.ids, ids) for r in (*runs, *ref_runs)):
        return {"auc_diff": math.nan, "diff_low": math.nan, "diff_high": math.nan, "p_bootstrap": math.nan,
                "p_delong_max": math.nan, "significant": "different ids"}  # fmt: skip
    labels = ref_runs[0].labels
    for r in (*runs, *ref_runs):
        if not np.array_equal(r.labels, labels):
            raise RuntimeError(
                f"{r.variant} seed {r.seed}: labels differ from the reference's on the same ids"
            )
    sig = spec.significance
    test = paired_bootstrap(
        labels, np.stack([r.probs for r in runs]), np.stack([r.probs for r in ref_runs]),
        sig.bootstrap_samples, sig.seed,
    )  # fmt: skip
    ref_by_seed = {r.seed: r for r in ref_runs}
    pairs = [(r, ref_by_seed[r.seed]) for r in runs if r.seed in ref_by_seed]
    if not pairs:  # a single-seed row (zero_shot) or reference: against every seed of the other
        pairs = [(r, q) for r in runs for q in ref_runs]
    p_delong = max(delong_paired_test(labels, r.probs, q.probs).p_value for r, q in pairs)
    return {
        "auc_diff": test.diff, "diff_low": test.low, "diff_high": test.high, "p_bootstrap": test.p_value,
        "p_delong_max": p_delong, "significant": "yes" if test.p_value < sig.alpha else "no",
    }  # fmt: skip


def comparison_rows(spec: ExperimentSpec, runs: list[RunResult]) -> list[dict[str, Any]]:
    """One row per ``spec.comparisons`` pair: both rows' mean AUC and the paired tests of row - against."""
    by_variant = {v.name: [r for r in runs if r.variant == v.name] for v in spec.variants}
    rows = []
    for name, against in spec.comparisons:
        rows.append({
            "row": name, "against": against,
            "auc_row": float(np.mean([r.metrics["auc"] for r in by_variant[name]])),
            "auc_against": float(np.mean([r.metrics["auc"] for r in by_variant[against]])),
            **significance(spec, by_variant[name], by_variant[against]),
        })  # fmt: skip
    return rows


def per_seed_rows(runs: list[RunResult]) -> list[dict[str, Any]]:
    return [
        {"variant": r.variant, "seed": r.seed, **{k: r.metrics[k] for k in r.metrics}, "folder": r.folder}
        for r in runs
    ]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:+.2f}%"


def _p(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2g}"


METRIC_TITLES = {
    "auc": "AUC", "logloss": "log loss", "gauc": "group AUC",
    "train_s_per_sample": "train s/sample", "infer_s_per_sample": "inference s/sample",
}  # fmt: skip


def comparisons_markdown(spec: ExperimentSpec, rows: list[dict[str, Any]]) -> list[str]:
    """The comparisons table of results.md (no lines when the spec has none)."""
    if not rows:
        return []
    label = {v.name: v.display for v in spec.variants}
    lines = [
        "Comparisons (the same paired tests, row against another row than the reference):",
        "",
        "| row | against | AUC (row / against, seed means) | ΔAUC [95% bootstrap] | p (bootstrap) | "
        "p (DeLong, max over seeds) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        star = " *" if r["significant"] == "yes" else ""
        diff = (
            f"{r['auc_diff']:+.4f} [{_fmt(r['diff_low'])}, {_fmt(r['diff_high'])}]"
            if not math.isnan(r["auc_diff"])
            else r["significant"]
        )
        lines.append(
            f"| {label[r['row']]} | {label[r['against']]} | {r['auc_row']:.4f} / {r['auc_against']:.4f} | "
            f"{diff} | {_p(r['p_bootstrap'])}{star} | {_p(r['p_delong_max'])} |"
        )
    return [*lines, ""]


def markdown(
    spec: ExperimentSpec,
    rows: list[dict[str, Any]],
    command: str,
    plots: list[str],
    comparisons: list[dict[str, Any]] = (),
) -> str:
    """results.md: the table with mean +- std, the CIs, Rel. and the tests, the comparisons, the plots."""
    rel = "Rel. = (row - ref) / ref" if spec.relative == "row_vs_reference" else "Rel. = (ref - row) / row"
    head = ["row", "mode", "seeds", "n"]
    for m in spec.metrics:
        head += [f"{METRIC_TITLES[m]} (mean ± std)", f"{METRIC_TITLES[m]} 95% CI", f"Rel. {METRIC_TITLES[m]}"]
    head += ["ΔAUC vs ref [95% bootstrap]", "p (bootstrap)", "p (DeLong, max over seeds)"]
    lines = [
        f"# Experiment `{spec.run_name}`",
        "",
        spec.description,
        "",
        f"Command: `{command}`. Spec: `{spec.source}`; base config `{spec.base}`; seeds {list(spec.seeds)}; "
        f"reference row **{spec.variant(spec.reference).display}**; split `{spec.split}` "
        f"({rows[0]['n_test']} evaluated ids, the same for every row).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|",
    ]
    for r in rows:
        name = f"**{r['label']}**" if r["variant"] == spec.reference else r["label"]
        cells = [name, r["mode"], str(r["seeds"]), str(r["n_test"])]
        for m in spec.metrics:
            digits = 3 if m.endswith("per_sample") else 4
            mean, std = r[f"{m}_mean"], r[f"{m}_std"]
            cells += [
                _fmt(mean, digits)
                if math.isnan(mean) or math.isnan(std)
                else f"{mean:.{digits}f} ± {std:.{digits}f}",
                "-"
                if math.isnan(r[f"{m}_ci_low"])
                else f"[{r[f'{m}_ci_low']:.{digits}f}, {r[f'{m}_ci_high']:.{digits}f}]",
                _pct(r[f"{m}_rel"]),
            ]
        if r["variant"] == spec.reference:
            cells += ["(reference)", "-", "-"]
        else:
            star = " *" if r["significant"] == "yes" else ""
            cells += [
                f"{r['auc_diff']:+.4f} [{_fmt(r['diff_low'])}, {_fmt(r['diff_high'])}]"
                if not math.isnan(r["auc_diff"]) else r["significant"],
                _p(r["p_bootstrap"]) + star,
                _p(r["p_delong_max"]),
            ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Mean ± std over the seeds (ddof 1); 95% CI of the mean: t-interval over the seeds (none for one seed). "
        f"{rel}, on the seed means. ΔAUC = mean AUC of the row minus the reference's; p (bootstrap): paired, "
        f"class-stratified bootstrap of that difference over the evaluated ids ({spec.significance.bootstrap_samples} "
        f"resamples, seed {spec.significance.seed}); * marks p < {spec.significance.alpha}. p (DeLong): the largest "
        "per-seed paired DeLong p. Both measure the noise of the test sample, the seeds' spread shows the "
        "noise of training.",
        "",
        *comparisons_markdown(spec, list(comparisons)),
        *[f"![{Path(p).stem}]({Path(p).name})" for p in plots],
        "",
        "Files: `results.csv` (this table), "
        + ("`comparisons.csv` (the comparisons), " if comparisons else "")
        + "`per_seed.csv` (every run), `plan.json` (stage folders); "
        "TensorBoard HParams: `tensorboard --logdir tb`.",
        "",
    ]
    return "\n".join(lines)

"""The final results of a pipeline run: ``report.md``, ``results.csv``, ``stage_times.csv``, ``results.png``.

Rows of the results table (all on the test split):

* ``sim`` on the whole test split (``sim/metrics.json``);
* for every stage-2 mode, the LLM on the test samples it evaluated (``plora.eval_max_samples`` of them, or
  all), read from ``<mode>/predictions_test.parquet``, and ``sim`` rescored on exactly those samples, so
  the CRM and the LLMs are compared on the same rows (modes that evaluated the same samples share one
  ``test subset`` label and one ``sim`` row).

Every metric is recomputed from per-sample predictions with :mod:`reclora_ds.metrics` (AUC with its 95% DeLong
confidence interval, log loss, and group AUC over users); the stage wall times come from the pipeline's
records. Rows with the same ``eval_set`` were scored on the same sample ids; compare only those.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from reclora_ds.metrics import delong_paired_test, evaluate_predictions
from reclora_ds.pipeline.config import PipelineSettings

log = logging.getLogger(__name__)

METRICS = ("auc", "auc_low", "auc_high", "logloss", "gauc")


def _metrics(labels: np.ndarray, probs: np.ndarray, users: np.ndarray) -> dict[str, float]:
    m = evaluate_predictions(labels, probs, users, gather=False)
    return {k: float(m[k]) for k in (*METRICS, "n")}


def paired_tests(scored: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]) -> list[dict[str, Any]]:
    """DeLong's paired test for every pair of models scored on the same test ids (sim and each mode).

    ``scored``: ``{eval_set: (labels, {model: p})}`` from :func:`results_rows`. One row per pair:
    eval_set, a, b, n, auc_a, auc_b, diff (a - b), se, p_value.
    """
    rows = []
    for eval_set, (labels, probs) in scored.items():
        names = list(probs)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                t = delong_paired_test(labels, probs[a], probs[b])
                rows.append(
                    {"eval_set": eval_set, "a": a, "b": b, "n": t.n, "auc_a": t.auc_a, "auc_b": t.auc_b,
                     "diff": t.diff, "se": t.se, "p_value": t.p_value}
                )  # fmt: skip
    return rows


def results_rows(
    run_dir: Path, settings: PipelineSettings, keep: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per (model, evaluated sample set): model, eval_set, n, auc, auc_low, auc_high, logloss, gauc.

    ``keep``: when given, filled with ``{eval_set: (labels, {model: p})}`` of every test subset."""
    from reclora_ds.training.crm_states import compute_crm_outputs

    sim_dir = run_dir / "sim"
    sim_test = json.loads((sim_dir / "metrics.json").read_text())["test"]
    rows = [{"model": "sim", "eval_set": "test (all)", **{k: float(sim_test[k]) for k in (*METRICS, "n")}}]
    subsets: dict[bytes, str] = {}  # sample ids -> their label; sim is scored once per distinct subset
    for mode in settings.pipeline.modes:
        path = run_dir / mode / "predictions_test.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: did the {mode} stage evaluate the test split?")
        pred = pq.read_table(path).to_pandas().sort_values("sample_id", kind="stable")
        ids = pred["sample_id"].to_numpy(np.int64)
        labels = pred["label"].to_numpy(np.float64)
        users = pred["user_index"].to_numpy(np.int64)
        key = hashlib.sha256(np.sort(ids).tobytes()).digest()
        if key not in subsets:
            subsets[key] = f"test subset {chr(ord('A') + len(subsets))} ({len(ids)})"
            got_ids, _, logits = compute_crm_outputs(sim_dir, run_dir / "prepare", sample_ids=ids)
            if not np.array_equal(got_ids, ids):
                raise RuntimeError("the CRM scored other samples than asked")
            sim_p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
            rows.append({"model": "sim", "eval_set": subsets[key], **_metrics(labels, sim_p, users)})
            if keep is not None:
                keep[subsets[key]] = (labels, {"sim": sim_p})
        p = pred["p"].to_numpy(np.float64)
        rows.append({"model": mode, "eval_set": subsets[key], **_metrics(labels, p, users)})
        if keep is not None:
            keep[subsets[key]][1][mode] = p
    return rows


def stage_times(run_dir: Path) -> list[dict[str, Any]]:
    """Wall time of every finished stage, in pipeline order of their start."""
    records = [json.loads(p.read_text()) for p in (run_dir / "_pipeline").glob("*.json")]
    done = [r for r in records if r.get("status") == "done"]
    order = sorted(done, key=lambda r: (r["started"], r["finished"]))  # second resolution: ties by end
    return [{"stage": r["stage"], "wall_s": r["wall_s"]} for r in order]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(path: Path, rows: list[dict[str, Any]], times: list[dict[str, Any]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['model']}\n{r['eval_set']}" for r in rows]
    x = np.arange(len(rows))
    auc = np.array([r["auc"] for r in rows])
    ci = np.array([[a - r["auc_low"], r["auc_high"] - a] for a, r in zip(auc, rows)]).T  # [2, rows]
    ax1.bar(x - 0.2, auc, 0.4, yerr=ci, capsize=3, label="AUC (95% CI)")
    ax1.bar(x + 0.2, [r["gauc"] for r in rows], 0.4, label="group AUC")
    ax1.set_xticks(x, labels, fontsize=7)
    ax1.set_ylim(0.4, 1.0)
    ax1.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax1.set_title("test split")
    ax1.legend()
    ax2.barh([t["stage"] for t in times][::-1], [t["wall_s"] for t in times][::-1])
    ax2.set_xlabel("wall time (s)")
    ax2.set_title("stages")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run_dir: str | Path, settings: PipelineSettings) -> Path:
    """Write the report files into ``run_dir``; returns the Markdown path."""
    run_dir = Path(run_dir)
    scored: dict[str, Any] = {}
    rows = results_rows(run_dir, settings, keep=scored)
    tests = paired_tests(scored)
    times = stage_times(run_dir)
    _write_csv(run_dir / "results.csv", rows)
    if tests:
        _write_csv(run_dir / "paired_tests.csv", tests)
    if times:
        _write_csv(run_dir / "stage_times.csv", times)
    p = settings.pipeline
    _plot(run_dir / "results.png", rows, times, f"reclora_ds pipeline {p.name}")
    table = [
        "| model | evaluated on | n | AUC | AUC 95% CI | log loss | group AUC |",
        "|---|---|---:|---:|---|---:|---:|",
        *[
            f"| {r['model']} | {r['eval_set']} | {int(r['n'])} | {r['auc']:.4f} | "
            f"[{r['auc_low']:.4f}, {r['auc_high']:.4f}] | {r['logloss']:.4f} | {r['gauc']:.4f} |"
            for r in rows
        ],
    ]
    paired = [
        "| evaluated on | a | b | AUC a - b | SE | p (paired DeLong) |",
        "|---|---|---|---:|---:|---:|",
        *[
            f"| {t['eval_set']} | {t['a']} | {t['b']} | {t['diff']:+.4f} | {t['se']:.4f} | {t['p_value']:.2g} |"
            for t in tests
        ],
    ]
    lines = [
        f"# Pipeline `{p.name}`",
        "",
        f"Config: `{settings.source}`; {p.nproc} rank(s), launcher {p.launcher}; backbone "
        f"`{settings.plora.backbone}`; stage-2 modes {', '.join(p.modes)}; few-shot training on "
        f"`{settings.plora.train_split}` ({settings.plora.max_steps or 'all'} steps, batch {settings.plora.batch_size}).",
        "",
        *table,
        "",
        "AUC intervals: DeLong's variance, normal approximation. Compare rows of the same `evaluated on` set "
        "only (the same sample ids). Paired DeLong tests on those ids (a difference with p >= 0.05 is within "
        "noise):",
        "",
        *paired,
        "",
        "| stage | wall time (s) |",
        "|---|---:|",
        *[f"| {t['stage']} | {t['wall_s']:.1f} |" for t in times],
        f"| total | {sum(t['wall_s'] for t in times):.1f} |",
        "",
        "![results](results.png)",
        "",
        "Files: `results.csv`, `paired_tests.csv`, `stage_times.csv`; TensorBoard: `tensorboard --logdir "
        + str(run_dir)
        + "`.",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    print("\n".join([*table, "", *paired] if tests else table))
    return path

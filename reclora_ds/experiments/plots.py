"""PNG figures of an experiment (matplotlib, Agg), shaped like the paper's.

* ``line`` (Fig. 4: AUC vs N_m; Fig. 5: vs ID history length; Fig. 6: vs few-shot size, one line per model):
  mean AUC over the seeds against each variant's ``x``, error bars = std over seeds (none for one seed),
  one line per ``series``;
* ``bars`` (Tables 2 and 3): mean AUC per row with the seeds' std, the reference row hatched;
* ``time`` (Table 4): AUC, training and inference seconds per sample per row, side by side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from reclora_ds.experiments.spec import ExperimentSpec


def _err(values: list[float]) -> list[float] | None:
    clean = [0.0 if math.isnan(v) else v for v in values]
    return clean if any(clean) else None


def write_plots(spec: ExperimentSpec, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write the spec's figure into ``out``; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{spec.run_name}: {spec.description}" if spec.description else spec.run_name
    paths = []
    if spec.plot.kind == "line":
        fig, ax = plt.subplots(figsize=(6, 4.2))
        series = list(dict.fromkeys(r["series"] for r in rows))
        for name in series:
            pts = sorted((float(r["x"]), r["auc_mean"], r["auc_std"]) for r in rows if r["series"] == name)
            x, y, e = (list(v) for v in zip(*pts))
            ax.errorbar(x, y, yerr=_err(e), marker="o", capsize=3, label=name or "AUC")
        if spec.plot.log_x:
            ax.set_xscale("log", base=2)
        xs = sorted({float(r["x"]) for r in rows})
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set_xlabel(spec.plot.x_label or "x")
        ax.set_ylabel(f"AUC ({spec.split}, mean over seeds)")
        ax.grid(alpha=0.3)
        if len(series) > 1 or series[0]:
            ax.legend()
    elif spec.plot.kind == "bars":
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4.5))
        x = np.arange(len(rows))
        bars = ax.bar(x, [r["auc_mean"] for r in rows], yerr=_err([r["auc_std"] for r in rows]), capsize=3)
        for bar, r in zip(bars, rows):
            if r["variant"] == spec.reference:
                bar.set_hatch("//")
            if r.get("significant") == "yes":
                ax.annotate(
                    "*", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
                )
        low = min(r["auc_mean"] for r in rows)
        ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(r["auc_mean"] for r in rows) + 0.05))
        ax.set_xticks(x, [r["label"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"AUC ({spec.split}, mean ± std over seeds)")
        ax.grid(axis="y", alpha=0.3)
    else:  # time: Table 4
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
        x = np.arange(len(rows))
        labels = [r["label"] for r in rows]
        for ax, metric, name in zip(
            axes,
            ("auc", "train_s_per_sample", "infer_s_per_sample"),
            ("AUC", "training s / sample", "inference s / sample"),
        ):
            if f"{metric}_mean" not in rows[0]:
                ax.set_visible(False)
                continue
            ax.bar(
                x,
                [r[f"{metric}_mean"] for r in rows],
                yerr=_err([r[f"{metric}_std"] for r in rows]),
                capsize=3,
            )
            for xi, r in zip(x, rows):
                rel = r[f"{metric}_rel"]
                if not math.isnan(rel) and r["variant"] != spec.reference:
                    ax.annotate(
                        f"{100 * rel:+.1f}%", (xi, r[f"{metric}_mean"]), ha="center", va="bottom", fontsize=8
                    )
            ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
            ax.set_title(name)
            if metric == "auc":
                ax.set_ylim(max(0.0, min(r["auc_mean"] for r in rows) - 0.05), 1.0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / f"{spec.run_name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths

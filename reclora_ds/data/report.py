"""A one-page PNG of a processed dataset: split sizes and label rates, history lengths, samples over time."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reclora_ds.data.preprocess import SPLITS, Prepared


def plot_summary(p: Prepared, title: str, path: Path) -> Path:
    """Write ``summary.png``: what a user checks first after ``prepare`` (a view, not an input of anything)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ids = {s: p.split_ids(s) for s in SPLITS}

    ax = axes[0]
    rows = [len(ids[s]) for s in SPLITS]
    bars = ax.bar(SPLITS, rows, color=["#4c72b0", "#dd8452", "#55a868"])
    for bar, s in zip(bars, SPLITS):
        rate = float(p.label_g[ids[s]].mean()) if len(ids[s]) else 0.0
        ax.annotate(
            f"label rate {rate:.3f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_ylabel("samples")
    ax.set_title("samples per split (global time order)")

    ax = axes[1]
    hist_len = p.hist_len_g[p.sample_ids]
    bins = np.unique(np.geomspace(max(1, hist_len.min()), hist_len.max() + 1, 40).astype(int))
    ax.hist(hist_len, bins=bins, color="#4c72b0")
    ax.set_xscale("log")
    ax.axvline(60, color="k", ls="--", lw=1, label="60 (CRM history)")
    ax.axvline(10, color="grey", ls=":", lw=1, label="10 (prompt history)")
    ax.set_xlabel("lifelong history length before the sample")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    ax.set_title("history lengths")

    ax = axes[2]
    days = p.timestamp_g[p.sample_ids] / 86400.0
    years = 1970 + days / 365.25
    ax.hist(years, bins=60, color="#8172b2")
    for s in SPLITS[1:]:
        if len(ids[s]):
            ax.axvline(1970 + p.timestamp_g[ids[s][0]] / 86400.0 / 365.25, color="k", ls="--", lw=1)
    ax.set_xlabel("year (dashed: start of valid, start of test)")
    ax.set_ylabel("samples")
    ax.set_title("samples over time")

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path

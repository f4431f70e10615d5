"""Benchmark the Long-Short Modality Retriever at ML-25M scale (or on a real processed dataset).

Synthetic mode (default) builds, in memory, an ML-25M-shaped set: 162,541 users whose history lengths follow
a Zipf rank-size law ``L(r) = 20 + floor(32,182 r^-b)`` (min 20 and max 32,202 as in ML-25M; ``b`` solved so
the lengths sum to exactly 25,000,095 rows), items drawn from a Zipf popularity law over 59,047 items (each at most once per user, as in MovieLens), and
clustered 512-d item vectors (a Gaussian mixture with a decaying spectrum, like PCA output), normalised
and snapped like the index's. Samples are the rows with at least 5 earlier rows (the recipe's default).
It then runs ``retrieve_rows`` for K_long=60 and K_short=10 into memory-mapped outputs and prints the wall
time, the engine's phase times and the peak RSS.

``--fraction F`` keeps every (1/F)-th user by activity rank, starting at rank 1/(2F) (a stratified subset
with about the same length distribution) and extrapolates the full-size time from the measured cost per scored pair.

    python benchmarks/bench_retrieval.py --fraction 0.04      # ~1M rows, extrapolated
    python benchmarks/bench_retrieval.py                      # the full 25M
    python benchmarks/bench_retrieval.py --processed runs/quickstart/prepare [--index runs/quickstart/index]
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from reclora_ds.retrieval.engine import DEFAULT_KS, EngineStats, retrieve_rows
from reclora_ds.retrieval.index_space import snap_unit_rows

ML25M_USERS = 162_541
ML25M_ITEMS = 59_047
ML25M_ROWS = 25_000_095
ML25M_MIN_LEN = 20
ML25M_MAX_LEN = 32_202
MIN_HISTORY = 5
DIM = 512


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def zipf_lengths(n_users: int, total: int, lo: int, hi: int) -> np.ndarray:
    """Rank-size power law with exact min, max and sum (bisection on the exponent)."""
    r = np.arange(1, n_users + 1, dtype=np.float64)

    def lengths(b: float) -> np.ndarray:
        return lo + np.floor((hi - lo) * r**-b).astype(np.int64)

    a, b = 0.01, 4.0
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (mid, b) if lengths(mid).sum() > total else (a, mid)
    out = lengths(b)
    out[1 : 1 + total - out.sum()] += 1  # the remainder, one row each (rank 1 keeps the max)
    return out


def clustered_vectors(n: int, d: int, rng: np.random.Generator, n_clusters: int = 256) -> np.ndarray:
    spectrum = np.arange(1, d + 1) ** -0.5  # PCA-like decaying variances
    centers = rng.standard_normal((n_clusters, d)) * spectrum
    x = centers[rng.integers(0, n_clusters, n)] + 0.5 * rng.standard_normal((n, d)) * spectrum
    return snap_unit_rows(x)


def distinct_per_user(items: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> None:
    """Redraw repeated items within a user uniformly until each user rates an item once (as in MovieLens)."""
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    rows = np.arange(len(items))
    for _ in range(1000):
        key = owner[rows] * ML25M_ITEMS + items[rows]
        order = np.argsort(key, kind="stable")
        dup = np.zeros(len(rows), dtype=bool)
        dup[order[1:]] = key[order[1:]] == key[order[:-1]]
        if not dup.any():
            return
        items[rows[dup]] = rng.integers(0, ML25M_ITEMS, int(dup.sum()))
        rows = rows[np.isin(owner[rows], np.unique(owner[rows[dup]]))]
    raise RuntimeError("could not make items distinct per user")


def synthetic(fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    lengths = zipf_lengths(ML25M_USERS, ML25M_ROWS, ML25M_MIN_LEN, ML25M_MAX_LEN)
    full_lengths = lengths
    if fraction < 1:
        stride = max(1, round(1 / fraction))
        lengths = lengths[stride // 2 :: stride]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    popularity = np.cumsum(np.arange(1, ML25M_ITEMS + 1, dtype=np.float64) ** -0.9)
    popularity /= popularity[-1]
    items = np.searchsorted(popularity, rng.random(offsets[-1])).astype(np.int32)
    items = rng.permutation(ML25M_ITEMS).astype(np.int32)[items]  # popularity unrelated to cluster
    distinct_per_user(items, lengths, rng)
    vectors = clustered_vectors(ML25M_ITEMS, DIM, rng)
    user = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths - MIN_HISTORY)
    hist = (
        np.arange(len(user))
        - np.repeat(offsets[:-1] - MIN_HISTORY * np.arange(len(lengths)), lengths - MIN_HISTORY)
        + MIN_HISTORY
    ).astype(np.int32)
    return items, offsets, user, hist, vectors, full_lengths


def needed_pairs(lengths: np.ndarray, k_min: int) -> int:
    """Sum over samples with h > k_min of h (what the engine must score)."""
    h0 = max(k_min + 1, MIN_HISTORY)
    top = lengths - 1
    return int(np.where(top >= h0, (top * (top + 1) - (h0 - 1) * h0) // 2, 0).sum())


def from_processed(path: str, index: str | None, seed: int):
    from reclora_ds.data.processed import ProcessedDataset
    from reclora_ds.retrieval.index import load_index
    from reclora_ds.retrieval.retriever import read_samples

    ds = ProcessedDataset(path)
    s = read_samples(ds)
    tl = ds.timelines
    if index:
        vectors = load_index(index).vectors()
    else:
        print("no --index: using synthetic clustered 512-d vectors for the dataset's items")
        vectors = clustered_vectors(ds.items.num_rows, DIM, np.random.default_rng(seed))
    return tl.item_index, tl.offsets, s.user_index, s.hist_len, vectors, np.diff(tl.offsets)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=1.0, help="keep every 1/F-th user (synthetic mode)")
    ap.add_argument("--processed", help="a processed dataset directory instead of synthetic data")
    ap.add_argument("--index", help="FAISS index directory for --processed (default: synthetic vectors)")
    ap.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    ap.add_argument("--work-dir", help="where the memory-mapped outputs go (default: a temporary folder)")
    ap.add_argument("--in-memory", action="store_true", help="keep outputs in RAM instead of memory maps")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    t0 = time.perf_counter()
    if args.processed:
        items, offsets, user, hist, vectors, lengths = from_processed(args.processed, args.index, args.seed)
        full_lengths = None
    else:
        items, offsets, user, hist, vectors, full_lengths = synthetic(args.fraction, args.seed)
        lengths = np.diff(offsets)
    t_gen = time.perf_counter() - t0
    n = len(user)
    pairs = needed_pairs(lengths, min(args.ks))
    print(
        f"data: {len(lengths):,} users, {int(offsets[-1]):,} timeline rows, {n:,} samples, {len(vectors):,} items x "
        f"{vectors.shape[1]}; max history {int(lengths.max()):,}; pairs to score {pairs:,}  (built in {t_gen:.1f}s)"
    )

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_retrieval_"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict[int, np.ndarray] = {}
    try:
        if args.in_memory:
            out = {k: np.empty((n, k), dtype=np.int32) for k in args.ks}
        else:
            out = {
                k: np.lib.format.open_memmap(work / f"rows_k{k}.npy", mode="w+", dtype=np.int32, shape=(n, k))
                for k in args.ks
            }
        rss0 = rss_mib()
        load0 = os.getloadavg()[0]
        stats = EngineStats()
        t0, c0 = time.perf_counter(), time.process_time()
        retrieve_rows(items, offsets, user, hist, vectors, args.ks, "similarity", out=out, stats=stats)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        for arr in out.values():
            if hasattr(arr, "flush"):
                arr.flush()
        print(
            f"retrieval K={args.ks}: wall {wall:.1f}s, CPU {cpu:.1f}s on {os.cpu_count()} cores "
            f"({wall / max(pairs, 1) * 1e9:.1f} ns wall per scored pair, {n / wall / 1e6:.3f} M samples/s); "
            f"load average before {load0:.2f}, after {os.getloadavg()[0]:.2f}"
        )
        print("  engine:", stats.as_dict())
        print(
            f"  RSS before retrieval {rss0:,.0f} MiB; peak RSS {peak_rss_mib():,.0f} MiB "
            f"(outputs {'in RAM' if args.in_memory else 'memory-mapped under ' + str(work)}, "
            f"{sum(a.nbytes for a in out.values()) / 2**20:,.0f} MiB)"
        )
        if full_lengths is not None and args.fraction < 1:
            full_pairs = needed_pairs(full_lengths, min(args.ks))
            full_samples = int((full_lengths - MIN_HISTORY).sum())
            est = wall * full_pairs / pairs
            print(
                f"  extrapolated to the full set ({full_samples:,} samples, {full_pairs:,} pairs): ~{est:.0f}s "
                f"({est / 60:.1f} min) at the same cost per pair"
            )
    finally:
        del out
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

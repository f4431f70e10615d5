"""How fast are CRM batches assembled? ``CRMBatchLoader`` against naive row-by-row ``datasets`` streaming.

    python benchmarks/bench_loader.py [--data DIR] [--batch-size 1024] [--history-length 60] [--epochs 3]

Without ``--data`` the bundled real MovieLens sample is prepared into a temporary folder first. Both
paths produce the same batch (target fields, label, last-L history ids, genres, rating buckets, mask):

  1. ``CRMBatchLoader`` on the train split, shuffled, several epochs (the first includes the parquet reads);
  2. ``ProcessedDataset.stream`` iterated row by row with the history gathered in Python, on
     ``--naive-rows`` rows only (it is far slower).

The loader should stay well above 200k samples/s, so that data loading is < 10% of a CRM step running
at 20k samples/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from bundled_data import processed_data

from reclora_ds.data.loader import RATING_SCALE, CRMBatchLoader
from reclora_ds.data.processed import ProcessedDataset, feature_columns

CRM_STEP_SAMPLES_PER_S = 20_000  # the CRM training speed the loader is measured against


def bench_loader(
    ds: ProcessedDataset, batch_size: int, length: int, epochs: int
) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    loader = CRMBatchLoader(ds, "train", batch_size, history_length=length, shuffle=True, seed=0)
    setup = time.perf_counter() - t0
    rates = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        n = sum(len(batch["sample_id"]) for batch in loader)
        rates.append(n / (time.perf_counter() - t0))
    return setup, rates


def bench_naive(ds: ProcessedDataset, batch_size: int, length: int, rows: int) -> float:
    """Row-by-row streaming, each sample's history built with Python lists (what the loader replaces)."""
    fields = feature_columns(ds.metadata)
    items = ds.items
    item_id = items.column("item_id").to_pylist()
    genre_id = items.column("genre_id").to_pylist()
    tl = ds.timelines
    tl_item, tl_rating, offsets = tl.item_index.tolist(), tl.rating.tolist(), tl.offsets.tolist()
    stream = ds.stream("train")  # set-up (file resolution) is not timed
    t0 = time.perf_counter()
    n = 0
    pending: list[dict] = []
    for row in stream:
        pending.append(row)
        n += 1
        if len(pending) == batch_size or n == rows:
            batch = {f: torch.tensor([r[f] for r in pending]) for f in ("sample_id", *fields)}
            batch["label"] = torch.tensor([float(r["label"]) for r in pending])
            hist_item, hist_genre, hist_rating, mask = [], [], [], []
            for r in pending:
                start = offsets[r["user_index"]]
                rows_ = list(range(start + max(0, r["hist_len"] - length), start + r["hist_len"]))
                pad = [0] * (length - len(rows_))
                hist_item.append(pad + [item_id[tl_item[j]] for j in rows_])
                hist_genre.append(pad + [genre_id[tl_item[j]] for j in rows_])
                hist_rating.append(pad + [round(RATING_SCALE * tl_rating[j]) for j in rows_])
                mask.append([False] * len(pad) + [True] * len(rows_))
            batch |= {
                "hist_item": torch.tensor(hist_item),
                "hist_genre": torch.tensor(hist_genre),
                "hist_rating": torch.tensor(hist_rating),
                "hist_mask": torch.tensor(mask),
            }
            batch["hist_len"] = batch["hist_mask"].sum(1)
            pending = []
        if n == rows:
            break
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="", help="processed dataset (default: prepare the bundled sample)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--history-length", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--naive-rows", type=int, default=5000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        data = processed_data(args.data, tmp)
        ds = ProcessedDataset(data)
        n_train = ds.metadata["splits"]["train"]["rows"]
        print(f"data {data}: train {n_train:,} samples, batch {args.batch_size}, L={args.history_length}")

        setup, rates = bench_loader(ds, args.batch_size, args.history_length, args.epochs)
        print(f"CRMBatchLoader setup (timelines, lookups): {setup:.2f} s")
        for epoch, rate in enumerate(rates):
            print(
                f"CRMBatchLoader epoch {epoch}: {rate:>12,.0f} samples/s ({1e3 * args.batch_size / rate:.2f} ms/batch)"
            )
        best = float(np.median(rates))
        naive = bench_naive(ds, args.batch_size, args.history_length, args.naive_rows)
        print(f"naive datasets row-by-row ({args.naive_rows:,} rows): {naive:>12,.0f} samples/s")
        print(f"speed-up (median loader epoch / naive): {best / naive:.1f}x")
        share = CRM_STEP_SAMPLES_PER_S / (CRM_STEP_SAMPLES_PER_S + best)
        print(f"loader share of a step at {CRM_STEP_SAMPLES_PER_S:,} CRM samples/s: {100 * share:.1f}%")


if __name__ == "__main__":
    main()

"""The prepare recipe in plain pandas, the way the predecessor's notebooks do it: a SPEED REFERENCE only.

Not part of the package and not used by it. ``benchmarks/bench_prepare.py`` times it against
``reclora_ds.data.prepare.prepare_dataset`` on the same rows, and ``tests/data/test_synthetic.py`` uses it
as an independent check of reclora_ds's recipe (same samples, labels, history lengths, splits, ids).

The recipe (reclora-facts section 3) on the ML-25M layout, written notebook style:

1. ``pd.read_csv`` ratings.csv and movies.csv; drop ratings whose movie is not in movies.csv.
2. Drop exact repeats of (user, movie, timestamp), keeping the first in file order, then sort by
   (timestamp, userId, movieId); the row number after the sort is the sample id.
3. ``groupby`` user and walk each user's rows in a Python loop, keeping the history as Python lists; a
   row with at least ``min_history`` earlier rows becomes a sample with ``hist_len`` = that number and a
   copy of the last 60 history movie ids and ratings (what the predecessor stores per sample).
4. Label = rating > 3.0. Split the samples 8:1:1 in global order.
5. Vocabularies of userId, movieId and first genre from the train era (every kept row up to the last
   training sample): id = 2 + position in the sorted values, 1 for values first seen later.
6. A seeded uniform few-shot subset of train; one parquet file per split (history lists included).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

HISTORY_COPY_LENGTH = 60
SPLITS = ("train", "valid", "test")
POSITIVE_ABOVE = 3.0  # ML-25M: rating > 3.0 is a positive


def read_raw(raw_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ratings.csv (userId,movieId,rating,timestamp) and movies.csv (movieId,title,genres)."""
    ratings = pd.read_csv(raw_dir / "ratings.csv")
    movies = pd.read_csv(raw_dir / "movies.csv", keep_default_na=False)
    return ratings, movies


def build_samples(
    ratings: pd.DataFrame,
    movies: pd.DataFrame,
    *,
    min_history: int = 5,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    few_shot_size: int = 70_000,
    seed: int = 42,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Every sample as one row (history lists included) with its ``split``; plus the drop counts."""
    drops = {}
    known = ratings["movieId"].isin(movies["movieId"])
    drops["unknown_item"] = int((~known).sum())
    ratings = ratings[known]
    before = len(ratings)
    ratings = ratings.drop_duplicates(["userId", "movieId", "timestamp"], keep="first")
    drops["duplicate_row"] = before - len(ratings)
    # (timestamp, userId, movieId) is unique now, so the order does not depend on sort stability
    ratings = ratings.sort_values(["timestamp", "userId", "movieId"]).reset_index(drop=True)

    rows = []
    for _, group in tqdm(ratings.groupby("userId", sort=False), desc="pandas histories", leave=False):
        hist_items: list[int] = []
        hist_ratings: list[float] = []
        for sample_id, item, rating in zip(group.index, group["movieId"], group["rating"]):
            if len(hist_items) >= min_history:
                rows.append(
                    (
                        sample_id,
                        len(hist_items),
                        hist_items[-HISTORY_COPY_LENGTH:],
                        hist_ratings[-HISTORY_COPY_LENGTH:],
                    )
                )
            hist_items.append(item)
            hist_ratings.append(rating)
    samples = pd.DataFrame(rows, columns=["sample_id", "hist_len", "hist_movie_ids", "hist_ratings"])
    samples = samples.sort_values("sample_id").reset_index(drop=True)
    samples = samples.join(ratings, on="sample_id")
    samples["label"] = (samples["rating"] > POSITIVE_ABOVE).astype("int8")
    drops["history_only"] = len(ratings) - len(samples)

    n = len(samples)
    n_train, n_train_valid = int(n * split[0]), int(n * (split[0] + split[1]))
    samples["split"] = np.where(
        samples.index < n_train, "train", np.where(samples.index < n_train_valid, "valid", "test")
    )

    first_genre = movies.set_index("movieId")["genres"].str.split("|").str[0]
    ratings["genre"] = ratings["movieId"].map(first_genre)
    samples["genre"] = samples["movieId"].map(first_genre)
    train_era = ratings.iloc[: samples["sample_id"].iloc[n_train - 1] + 1]
    for column, name in (("userId", "user_id"), ("movieId", "item_id"), ("genre", "genre_id")):
        vocab = {v: i + 2 for i, v in enumerate(sorted(train_era[column].unique()))}
        samples[name] = samples[column].map(vocab).fillna(1).astype("int32")

    train_ids = samples.loc[samples["split"] == "train", "sample_id"].to_numpy()
    rng = np.random.default_rng(seed)
    fewshot = rng.choice(train_ids, size=min(few_shot_size, len(train_ids)), replace=False)
    samples["fewshot"] = samples["sample_id"].isin(fewshot)
    return samples, drops


def write_samples(samples: pd.DataFrame, out_dir: Path) -> None:
    """One parquet file per split (train, valid, test, fewshot), history lists included."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        samples[samples["split"] == split].to_parquet(out_dir / f"{split}.parquet", index=False)
    samples[samples["fewshot"]].to_parquet(out_dir / "fewshot.parquet", index=False)


def run(raw_dir: Path, out_dir: Path) -> dict:
    """Read, build and write; wall times per stage and counts."""
    timings = {}
    t0 = time.perf_counter()
    ratings, movies = read_raw(raw_dir)
    timings["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples, drops = build_samples(ratings, movies)
    timings["process"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_samples(samples, out_dir)
    timings["write"] = time.perf_counter() - t0
    timings["total"] = sum(timings.values())
    timings["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "raw_rows": len(ratings),
        "samples": len(samples),
        "splits": {s: int((samples["split"] == s).sum()) for s in SPLITS},
        "fewshot": int(samples["fewshot"].sum()),
        "drops": drops,
        "timings": timings,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", required=True, type=Path, help="ML-25M-layout folder (ratings.csv, movies.csv)")
    ap.add_argument("--out", required=True, type=Path, help="folder for the per-split parquet files")
    ap.add_argument("--result", type=Path, help="write counts and timings as JSON here")
    args = ap.parse_args(argv)
    result = run(args.raw, args.out)
    if args.result:
        args.result.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["timings"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tests of the SYNTHETIC ML-25M-layout generator, and an independent check of the prepare recipe.

The generator tests read the written files back with the csv module / pyarrow (schema, header, counts,
determinism, skew). The recipe check runs ``prepare_dataset`` and the plain pandas reference of
``benchmarks/pandas_reference.py`` (python loops over each user's rows, no code shared with reclora_ds) on
the same small synthetic folder, with repeated and unknown-movie rows added, and compares every sample.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from reclora_ds.data.config import PrepareConfig
from reclora_ds.data.prepare import prepare_dataset
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.data.synthetic import (
    FIRST_TIMESTAMP,
    GENRE_COUNTS,
    HALF_STARS_FROM,
    LAST_TIMESTAMP,
    NO_GENRE,
    RATING_LEVELS,
    SyntheticConfig,
    existing_synthetic,
    scaled_config,
    write_synthetic_ml25m,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = SyntheticConfig(rows=12_000, users=150, items=700, seed=3)


def load_pandas_reference():
    spec = importlib.util.spec_from_file_location(
        "pandas_reference", ROOT / "benchmarks" / "pandas_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_ratings(path: Path) -> dict[str, np.ndarray]:
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={"rating": pa.string()}))
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_synthetic_ml25m(tmp_path_factory.mktemp("synth") / "raw", SMALL).raw_dir


def test_ratings_schema_counts_and_order(small):
    text = (small / "ratings.csv").read_text()
    lines = text.splitlines()
    assert lines[0] == "userId,movieId,rating,timestamp"
    assert text.endswith("\n") and "\r" not in text and '"' not in text
    assert len(lines) - 1 == SMALL.rows
    r = read_ratings(small / "ratings.csv")
    user, item, ts = r["userId"], r["movieId"], r["timestamp"]
    assert set(r["rating"]) <= set(RATING_LEVELS) and {"4.0", "3.5", "0.5", "5.0"} <= set(r["rating"])
    np.testing.assert_array_equal(np.unique(user), np.arange(1, SMALL.users + 1))
    assert np.bincount(user)[1:].min() >= SMALL.min_user_ratings
    assert len(np.unique(item)) == SMALL.items  # every rated movie has a rating
    assert len(np.unique(user * 10**9 + item)) == SMALL.rows  # no repeated (user, movie) pair
    # ordered by user, then movieId, like the real file
    assert np.all((np.diff(user) > 0) | ((np.diff(user) == 0) & (np.diff(item) > 0)))
    assert ts.min() >= FIRST_TIMESTAMP and ts.max() <= LAST_TIMESTAMP
    stars = r["rating"].astype(float)
    assert np.all(stars[ts < HALF_STARS_FROM] % 1 == 0)  # whole stars only before half stars existed


def test_movies_csv_like_the_real_one(small):
    text = (small / "movies.csv").read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["movieId", "title", "genres"]
    movies = rows[1:]
    assert len(movies) == SMALL.items + SMALL.n_unrated
    ids = np.array([int(m[0]) for m in movies])
    assert np.all(np.diff(ids) > 0) and ids[-1] > len(ids)  # sparse, ascending ids
    assert any(", The (" in m[1] for m in movies)
    assert '"Movie ' in text and ", The (" in text  # titles with commas are quoted
    valid = set(GENRE_COUNTS)
    for _, title, genres in movies:
        assert title.endswith(")") and title[-5:-1].isdigit() and title[-7:-5] == " ("
        names = genres.split("|")
        assert names == [NO_GENRE] or (set(names) <= valid and names == sorted(names))
    rated = np.unique(read_ratings(small / "ratings.csv")["movieId"])
    assert np.isin(rated, ids).all()


def test_deterministic_by_seed(small, tmp_path):
    again = write_synthetic_ml25m(tmp_path / "again", SMALL).raw_dir
    for name in ("ratings.csv", "movies.csv"):
        assert sha256(again / name) == sha256(small / name)
    other = write_synthetic_ml25m(
        tmp_path / "other", SyntheticConfig(**{**SMALL.__dict__, "seed": 4})
    ).raw_dir
    assert sha256(other / "ratings.csv") != sha256(small / "ratings.csv")
    assert existing_synthetic(again, SMALL)
    assert not existing_synthetic(again, SyntheticConfig(**{**SMALL.__dict__, "seed": 4}))


def gini(counts: np.ndarray) -> float:
    x = np.sort(counts).astype(np.float64)
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * x.sum()))


def test_power_law_skew_and_rating_distribution(tmp_path):
    cfg = scaled_config(300_000, seed=5)
    r = read_ratings(write_synthetic_ml25m(tmp_path / "raw", cfg).raw_dir / "ratings.csv")
    users = np.bincount(r["userId"])[1:]
    items = np.unique(r["movieId"], return_counts=True)[1]
    # heavy tails: a few users and movies hold much of the data
    assert users.max() > 15 * np.median(users)
    assert np.sort(users)[::-1][: len(users) // 100].sum() > 0.08 * users.sum()
    assert items.max() > 30 * np.median(items)
    assert gini(items) > 0.7 and gini(users) > 0.4
    stars = r["rating"].astype(float)
    assert 3.4 < stars.mean() < 3.65
    assert 0.6 < (stars > 3.0).mean() < 0.65


def test_scaled_config_and_validation():
    full = scaled_config(25_000_095)
    assert (full.rows, full.users, full.items) == (25_000_095, 162_541, 59_047)
    assert full.n_unrated == 3_376
    with pytest.raises(ValueError, match="min_user_ratings"):
        SyntheticConfig(rows=100, users=10, items=50)


def test_cli_writes_a_scaled_folder(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "make_synthetic_ml25m.py"),
            "--out",
            str(out),
            "--rows",
            "5000",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "SYNTHETIC" in proc.stdout
    assert (out / "ratings.csv").read_text().count("\n") == 5001
    assert existing_synthetic(out, scaled_config(5000))


def test_prepare_dataset_runs_on_synthetic(small, tmp_path):
    result = prepare_dataset(
        PrepareConfig(
            dataset="ml-25m", raw_dir=str(small), output_dir=str(tmp_path / "out"), shards_per_split=2
        )
    )
    c = result.metadata["counts"]
    assert c["raw_rows"] == SMALL.rows and c["users"] == SMALL.users and c["items"] == SMALL.items
    assert c["samples"] == SMALL.rows - 5 * SMALL.users
    assert set(result.metadata["drops"]) == {"history_only"}


# ----------------------------------------------------------------------------------------------------------
# reclora_ds vs the plain pandas reference
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def messy(small, tmp_path_factory) -> Path:
    """The small set plus exact repeats (one with another rating), unknown movies and cross-user ties."""
    raw = tmp_path_factory.mktemp("messy")
    (raw / "movies.csv").write_bytes((small / "movies.csv").read_bytes())
    lines = (small / "ratings.csv").read_text().splitlines()
    u, m, _, t = lines[100].split(",")
    extra = [
        lines[100],  # exact repeat: dropped
        f"{u},{m},0.5,{t}",  # same (user, movie, time), other rating: dropped, the first one wins
        lines[2000],
        f"{u},999999999,4.0,{t}",  # unknown movie
        "2,999999998,1.0,1000000000",
    ]
    u2, m2, _, t2 = lines[5000].split(",")
    other_user = 1 if u2 != "1" else 2
    extra.append(f"{other_user},{m2},4.5,{t2}")  # another user at the same second (if not rated yet)
    (raw / "ratings.csv").write_text("\n".join(lines + extra) + "\n")
    return raw


def test_reclora_ds_matches_pandas_reference(messy, tmp_path):
    ref = load_pandas_reference()
    ratings, movies = ref.read_raw(messy)
    expected, ref_drops = ref.build_samples(ratings, movies, few_shot_size=500, seed=42)

    cfg = PrepareConfig(
        dataset="ml-25m", raw_dir=str(messy), output_dir=str(tmp_path / "out"), few_shot_size=500, seed=42
    )
    result = prepare_dataset(cfg)
    drops = {k: v["count"] for k, v in result.metadata["drops"].items()}
    assert drops == {k: v for k, v in ref_drops.items() if v}
    assert drops["duplicate_row"] == 3 and drops["unknown_item"] == 2

    ds = ProcessedDataset(result.output_dir)
    raw_user = ds.users.column("user").to_numpy()
    raw_item = ds.items.column("item").to_numpy()
    tl = ds.timelines
    item_of_timeline = raw_item[tl.item_index]
    for split in ("train", "valid", "test", "fewshot"):
        got = ds.read_split(split).to_pandas()
        want = expected[expected["fewshot"]] if split == "fewshot" else expected[expected["split"] == split]
        assert len(got) == len(want), split
        got_key = list(zip(raw_user[got["user_index"]], raw_item[got["item_index"]], got["timestamp"]))
        want_key = list(zip(want["userId"], want["movieId"], want["timestamp"]))
        assert got_key == want_key, split  # same samples in the same global order
        np.testing.assert_array_equal(got["sample_id"], want["sample_id"])
        np.testing.assert_array_equal(got["hist_len"], want["hist_len"])
        np.testing.assert_array_equal(got["label"], want["label"])
        np.testing.assert_allclose(got["rating"], want["rating"])
        for column in ("user_id", "item_id"):
            np.testing.assert_array_equal(got[column], want[column])
        np.testing.assert_array_equal(got["genre"], want["genre_id"])
        # the last 60 history movies = the user's timeline before the sample
        for row, hist in zip(got.itertuples(), want["hist_movie_ids"]):
            start = tl.offsets[row.user_index]
            np.testing.assert_array_equal(
                item_of_timeline[start + max(0, row.hist_len - 60) : start + row.hist_len], hist
            )

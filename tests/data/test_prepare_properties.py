"""Properties of the processed dataset, checked against an independent plain-Python reading of the raw files."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from reclora_ds.data.config import PrepareConfig
from reclora_ds.data.prepare import prepare_dataset
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.data.text import text_views


def reference_recipe(rows, min_history=5, fractions=(0.8, 0.1, 0.1)):
    """Plain Python: sort by (ts, user, item), per-user positions, drop short histories, split 8:1:1."""
    rows = sorted(rows, key=lambda r: (r[3], r[0], r[1]))
    seen = defaultdict(int)
    samples = []
    for user, item, rating, ts in rows:
        if seen[user] >= min_history:
            samples.append((user, item, ts, rating, seen[user]))
        seen[user] += 1
    n = len(samples)
    a, b = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
    return {"train": samples[:a], "valid": samples[a:b], "test": samples[b:]}


def read_ml25m_ratings(path: Path):
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)
        return [(int(u), int(i), float(r), int(t)) for u, i, r, t in reader]


def read_ml1m_ratings(path: Path):
    with open(path) as f:
        return [
            tuple(conv(x) for conv, x in zip((int, int, float, int), line.strip().split("::")))
            for line in f
            if line.strip()
        ]


def split_rows(result, split):
    ds = ProcessedDataset(result.output_dir)
    t = ds.read_split(split)
    users = ds.users.column("user").to_numpy()
    items = ds.items.column("item").to_numpy()
    return ds, t, users[t.column("user_index").to_numpy()], items[t.column("item_index").to_numpy()]


@pytest.mark.parametrize("name", ["ml_small", "ml1m"])
def test_recipe_matches_independent_reference(name, request, ml_small_dir, ml1m_dir):
    result = request.getfixturevalue(f"{name}_prepared")
    raw = (
        read_ml25m_ratings(ml_small_dir / "ratings.csv")
        if name == "ml_small"
        else read_ml1m_ratings(ml1m_dir / "ratings.dat")
    )
    ref = reference_recipe(raw)
    threshold = (lambda r: r > 3.0) if name == "ml_small" else (lambda r: r >= 4)
    for split, expected in ref.items():
        ds, t, users, items = split_rows(result, split)
        got = list(
            zip(
                users.tolist(),
                items.tolist(),
                t.column("timestamp").to_pylist(),
                t.column("rating").to_pylist(),
                t.column("hist_len").to_pylist(),
            )
        )
        assert got == [(u, i, ts, pytest.approx(r), h) for u, i, ts, r, h in expected]
        assert t.column("label").to_pylist() == [int(threshold(r)) for *_, r, _h in expected]
    assert result.metadata["accounting"]["raw_rows"] == len(raw)


def test_ml1m_table1_arithmetic(ml1m_prepared):
    # Table 1: ML-1M samples = ratings - 5 x users (each user's first 5 rows are history only).
    counts = ml1m_prepared.metadata["counts"]
    assert counts["samples"] == counts["raw_rows"] - 5 * counts["users"] == 12_976 - 5 * 100


def test_no_history_item_at_or_after_its_sample(ml_small_prepared):
    ds = ProcessedDataset(ml_small_prepared.output_dir)
    tl = ds.timelines
    for split in ("train", "valid", "test"):
        t = ds.read_split(split)
        for sid, u, h, ts in zip(
            *(t.column(c).to_numpy() for c in ("sample_id", "user_index", "hist_len", "timestamp"))
        ):
            hist = tl.history(u, h)
            assert (tl.sample_id[hist] < sid).all()
            assert (tl.timestamp[hist] <= ts).all()
            nxt = int(tl.offsets[u]) + int(h)  # the sample itself sits right after its history
            assert tl.sample_id[nxt] == sid


def test_split_boundaries_follow_global_order(ml_small_prepared):
    ds = ProcessedDataset(ml_small_prepared.output_dir)
    parts = [ds.read_split(s) for s in ("train", "valid", "test")]
    ids = [p.column("sample_id").to_numpy() for p in parts]
    ts = [p.column("timestamp").to_numpy() for p in parts]
    for i in range(2):
        assert ids[i].max() < ids[i + 1].min()
        assert ts[i].max() <= ts[i + 1].min()
    sizes = [len(x) for x in ids]
    n = sum(sizes)
    assert sizes[0] == int(0.8 * n) and sizes[0] + sizes[1] == int(0.9 * n)
    for x in ids:
        assert (np.diff(x) > 0).all()


def test_vocab_round_trip_and_oov(ml_small_prepared):
    ds = ProcessedDataset(ml_small_prepared.output_dir)
    items = ds.items
    raw_ids = items.column("item").to_numpy()
    enc = items.column("item_id").to_numpy()
    known = enc >= 2
    assert ds.decode("item_id", enc[known]) == raw_ids[known].tolist()
    # Vocabulary = items seen in the train era; items first seen later are OOV (id 1).
    train = ds.read_split("train")
    last_train = train.column("sample_id").to_numpy().max()
    tl = ds.timelines
    era_items = set(tl.item_index[tl.sample_id <= last_train].tolist())
    assert set(np.flatnonzero(known).tolist()) == era_items
    assert (enc[~known] == 1).all() and (~known).any()
    genres = items.column("genre").to_pylist()
    decoded = ds.decode("genre", items.column("genre_id").to_numpy())
    assert all(d == g for d, g, k in zip(decoded, genres, known) if k)
    assert ds.metadata["fields"]["item_id"]["vocab_size"] == known.sum() + 2


def test_fewshot_is_seeded_subset_of_train(tmp_path, ml_small_dir, ml_small_prepared):
    ds = ProcessedDataset(ml_small_prepared.output_dir)
    few = ds.read_split("fewshot").column("sample_id").to_numpy()
    train = ds.read_split("train").column("sample_id").to_numpy()
    assert len(few) == 5000 and len(np.unique(few)) == 5000 and np.isin(few, train).all()
    # Uniform over train: the subset's mean position is near the middle of train.
    assert abs(np.searchsorted(train, few).mean() / len(train) - 0.5) < 0.03
    other = prepare_dataset(
        PrepareConfig(raw_dir=str(ml_small_dir), output_dir=str(tmp_path), few_shot_size=5000, seed=43)
    )
    few43 = ProcessedDataset(other.output_dir).read_split("fewshot").column("sample_id").to_numpy()
    assert not np.array_equal(few, few43)
    everything = prepare_dataset(
        PrepareConfig(raw_dir=str(ml_small_dir), output_dir=str(tmp_path / "all"), few_shot_size=200_000)
    )
    assert everything.metadata["splits"]["fewshot"]["rows"] == everything.metadata["splits"]["train"]["rows"]


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "run_info.json"
    }


def test_same_config_and_seed_give_byte_identical_outputs(tmp_path, ml1m_dir):
    cfg = PrepareConfig(
        dataset="ml-1m", raw_dir=str(ml1m_dir), output_dir=str(tmp_path / "out"), few_shot_size=500
    )
    prepare_dataset(cfg)
    first = _digest(tmp_path / "out")
    prepare_dataset(cfg)
    assert _digest(tmp_path / "out") == first
    assert {
        "metadata.json",
        "config.yaml",
        "timelines.parquet",
        "users.parquet",
        "items.parquet",
        "vocabs.json",
        "summary.png",
    } <= set(first)
    assert (tmp_path / "out" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("shards", [4, 3])
def test_two_ranks_see_disjoint_samples_covering_the_split(tmp_path, ml1m_dir, shards):
    out = prepare_dataset(
        PrepareConfig(
            dataset="ml-1m",
            raw_dir=str(ml1m_dir),
            output_dir=str(tmp_path),
            shards_per_split=shards,
            few_shot_size=500,
        )
    )
    ds = ProcessedDataset(out.output_dir)
    for split in ("train", "test", "fewshot"):
        per_rank = [[row["sample_id"] for row in ds.stream(split, rank, 2)] for rank in range(2)]
        assert not set(per_rank[0]) & set(per_rank[1])
        assert sorted(per_rank[0] + per_rank[1]) == ds.read_split(split).column("sample_id").to_pylist()
        assert min(len(r) for r in per_rank) > 0


def test_metadata_describes_the_dataset(ml1m_prepared, ml1m_dir):
    m = ml1m_prepared.metadata
    assert m["schema_version"] == 1 and m["dataset"] == "ml-1m" and m["label_rule"] == "rating >= 4"
    assert list(m["fields"]) == ["user_id", "gender", "age", "occupation", "zipcode", "item_id", "genre"]
    assert m["fields"]["gender"]["vocab_size"] == 4  # PAD, OOV, F, M
    assert {f["name"] for f in m["raw_files"]} == {"ratings.dat", "users.dat", "movies.dat"}
    digest = hashlib.sha256((ml1m_dir / "ratings.dat").read_bytes()).hexdigest()
    assert [f["sha256"] for f in m["raw_files"] if f["name"] == "ratings.dat"] == [digest]
    for split, s in m["splits"].items():
        labels = pq.read_table(ml1m_prepared.output_dir / "samples" / m["shards"][split][0]).column("label")
        assert 0 < s["label_rate"] < 1 and len(labels) > 0
    assert m["config"]["dataset"] == "ml-1m" and (ml1m_prepared.output_dir / "config.yaml").is_file()
    h = m["history_storage"]
    assert h["copied_bytes"] == m["counts"]["samples"] * 60 * 8 and h["ratio"] > 1


def test_text_view_joins_by_sample_id(ml1m_prepared, ml1m_dir):
    ds = ProcessedDataset(ml1m_prepared.output_dir)
    t = ds.read_split("test")
    rng = np.random.default_rng(0)
    picked = rng.choice(t.column("sample_id").to_numpy(), 20, replace=False)
    views = text_views(ds, "test", picked[::-1], history_length=10)
    titles = {}
    with open(ml1m_dir / "movies.dat", encoding="iso-8859-1") as f:
        for line in f:
            mid, title, _ = line.rstrip("\n").split("::")
            titles[int(mid)] = title
    users = ds.users.column("user").to_numpy()
    by_id = {sid: i for i, sid in enumerate(t.column("sample_id").to_pylist())}
    raw = read_ml1m_ratings(ml1m_dir / "ratings.dat")
    for sid in picked.tolist():
        row = by_id[sid]
        item = ds.items.column("item").to_numpy()[t.column("item_index")[row].as_py()]
        user = users[t.column("user_index")[row].as_py()]
        ts = t.column("timestamp")[row].as_py()
        assert views[sid]["target"] == titles[item]
        earlier = sorted(
            (r for r in raw if r[0] == user and (r[3], r[1]) < (ts, item)), key=lambda r: (r[3], r[1])
        )[-10:]
        assert views[sid]["history"] == [(titles[r[1]], r[2]) for r in earlier]
        assert views[sid]["profile"].startswith("The user is a ")

"""The Long-Short Modality Retriever against a plain-Python reference, a hand-checked example and its invariants."""

from __future__ import annotations

import hashlib
import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest

from reclora_ds.data.histories import RetrievedHistoriesError, load_retrieved
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.retrieval import engine
from reclora_ds.retrieval.engine import EngineStats, retrieve_rows
from reclora_ds.retrieval.errors import RetrievalInputError
from reclora_ds.retrieval.index import (
    build_index,
    load_index,
    load_item_embeddings,
    make_sidecar,
    save_index,
)
from reclora_ds.retrieval.index_space import fit_pca, snap_unit_rows, to_index_space
from reclora_ds.retrieval.retriever import read_samples, retrieve_histories
from tests.item_index import build_item_index

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def opened(data: Path, mode: str = "similarity", **kwargs):
    """The retrieval folder the retriever wrote beside ``data`` by default, checked against ``data``."""
    return load_retrieved(data / "retrieved" / mode, data, mode=mode, **kwargs)


def brute_force(items, offsets, user, hist_len, vectors, k, mode="similarity"):
    """Reference: a Python loop over samples; score every earlier row in float64, sort, keep k, re-sort by time."""
    out = np.full((len(user), k), -1, dtype=np.int32)
    for s in range(len(user)):
        start, h = int(offsets[user[s]]), int(hist_len[s])
        if mode == "recent":
            chosen = list(range(max(0, h - k), h))
        else:
            target = vectors[items[start + h]].astype(np.float64)
            scores = vectors[items[start : start + h]].astype(np.float64) @ target
            ranked = sorted(range(h), key=lambda j: (-scores[j], -j))  # best first; ties: the more recent
            chosen = sorted(ranked[:k])
        out[s, : len(chosen)] = [start + j for j in chosen]
    return out


# ----------------------------------------------------------------------------------------------------------
# A hand-checked example
# ----------------------------------------------------------------------------------------------------------

# Items on the unit circle at these angles (degrees); item 5 is item 2 again (identical text, identical vector).
ANGLES = [0, 90, 30, 60, 180, 30]
TIMELINES = [[0, 1, 2, 3, 4], [4, 2, 5, 0], [1, 3], [2, 1, 5, 3]]  # items per user in time order
# timeline rows: user 0 -> 0-4, user 1 -> 5-8, user 2 -> 9-10, user 3 -> 11-14
SAMPLES = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (3, 1), (3, 2), (3, 3)]
# Cosines to the target item decide; equal cosines (30 degrees either side) go to the more recent row.
EXPECTED_K2 = [
    [0, -1],  # u0 h1 target 90: only row 0
    [0, 1],  # u0 h2 target 30: rows 0 (cos 30) and 1 (cos 60), all it has
    [1, 2],  # u0 h3 target 60: rows 1 and 2 tie at cos 30, row 0 (cos 60) is out
    [1, 3],  # u0 h4 target 180: row 1 (cos 90 = 0) and row 3 (cos 120) beat rows 2 and 0
    [5, -1],  # u1 h1 target 30: only row 5
    [5, 6],  # u1 h2 target = item 2's vector: both rows
    [6, 7],  # u1 h3 target 0: rows 6, 7 (cos 30, identical vectors) beat row 5 (cos 180)
    [-1, -1],  # u2 h0: no history
    [9, -1],  # u2 h1 target 60: only row 9
    [11, -1],  # u3 h1 target 90: only row 11
    [11, 12],  # u3 h2 target 30: both rows
    [
        12,
        13,
    ],  # u3 h3 target 60: rows 11, 12, 13 all at cos 30 (a 3-way tie on the K boundary): the latest two
]
# K=1: u0 h3, u1 h3 and u3 h3 are ties for first place; the later row wins
EXPECTED_K1 = [[0], [0], [2], [1], [5], [6], [7], [-1], [9], [11], [11], [13]]
EXPECTED_RECENT_K2 = [
    [0, -1],
    [0, 1],
    [1, 2],
    [2, 3],
    [5, -1],
    [5, 6],
    [6, 7],
    [-1, -1],
    [9, -1],
    [11, -1],
    [11, 12],
    [12, 13],
]


def tiny():
    vectors = snap_unit_rows(np.array([[np.cos(np.radians(a)), np.sin(np.radians(a))] for a in ANGLES]))
    items = np.concatenate(TIMELINES).astype(np.int32)
    offsets = np.cumsum([0] + [len(t) for t in TIMELINES])
    user, hist_len = (np.array(c) for c in zip(*SAMPLES))
    return items, offsets, user, hist_len, vectors


@pytest.mark.parametrize("topk_from", [2048, 1], ids=["sort-path", "topk-path"])
def test_hand_checked_example(monkeypatch, topk_from):
    monkeypatch.setattr(engine, "_TOPK_MIN_COLUMNS", topk_from)
    items, offsets, user, hist_len, vectors = tiny()
    stats = EngineStats()
    got = retrieve_rows(items, offsets, user, hist_len, vectors, ks=(2, 1), stats=stats)
    assert got[2].tolist() == EXPECTED_K2
    assert got[1].tolist() == EXPECTED_K1
    assert stats.tie_rows == 1  # u3 h3: the K=2 boundary tie goes through the explicit recency rule
    for k in (2, 1):
        assert got[k].tolist() == brute_force(items, offsets, user, hist_len, vectors, k).tolist()
    recent = retrieve_rows(items, offsets, user, hist_len, None, ks=(2,), mode="recent")
    assert recent[2].tolist() == EXPECTED_RECENT_K2


def test_engine_rejects_bad_inputs():
    items, offsets, user, hist_len, vectors = tiny()
    with pytest.raises(ValueError, match="past the end"):
        retrieve_rows(items, offsets, user, hist_len + 2, vectors)
    with pytest.raises(ValueError, match="distinct positive"):
        retrieve_rows(items, offsets, user, hist_len, vectors, ks=(10, 10))
    with pytest.raises(ValueError, match="needs the index vectors"):
        retrieve_rows(items, offsets, user, hist_len, None)


# ----------------------------------------------------------------------------------------------------------
# The bundled real MovieLens sample, end to end (embeddings dir -> index dir -> retrieved dir)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ml_small_prepared):
    """A private copy of the prepared bundled data, genre-clustered embeddings with exact duplicates, an index."""
    root = tmp_path_factory.mktemp("retrieval")
    data = root / "data"
    shutil.copytree(ml_small_prepared.output_dir, data)
    ds = ProcessedDataset(data)
    emb_dir, _ = build_item_index(data, root, dim=48, components=32, noise=0.8, duplicates=0.3)
    result = retrieve_histories(data, root / "index")
    return {"root": root, "data": data, "ds": ds, "index": root / "index", "result": result, "emb": emb_dir}


def test_matches_brute_force_on_bundled_data(setup):
    ds = setup["ds"]
    vectors = load_index(setup["index"]).vectors()
    s = read_samples(ds)
    tl = ds.timelines
    lengths = np.diff(tl.offsets)
    users = np.concatenate(
        [np.argsort(lengths)[-1:], np.random.default_rng(1).choice(len(lengths), 25, replace=False)]
    )
    pick = np.flatnonzero(np.isin(s.user_index, users))
    assert lengths[users].max() > engine._TOPK_MIN_COLUMNS  # the longest user reaches the torch.topk path
    hist = opened(setup["data"], index_sha256=load_index(setup["index"]).sha256)
    assert setup["result"].meta["engine"]["tie_rows"] > 0  # duplicate vectors put ties on the K boundary
    for k in (60, 10):
        expected = brute_force(tl.item_index, tl.offsets, s.user_index[pick], s.hist_len[pick], vectors, k)
        np.testing.assert_array_equal(hist.lookup(s.sample_id[pick], k), expected)


def test_invariants_on_every_sample(setup):
    ds = setup["ds"]
    s = read_samples(ds)
    tl = ds.timelines
    hist = opened(setup["data"])
    assert np.array_equal(hist.sample_ids, s.sample_id)
    start = tl.offsets[s.user_index][:, None]
    for k in (60, 10):
        rows = np.asarray(hist.rows[k])
        valid = rows >= 0
        n_valid = valid.sum(axis=1)
        assert np.array_equal(n_valid, np.minimum(s.hist_len, k))  # min(h, K) kept, the rest is -1
        assert (valid[:, :-1] >= valid[:, 1:]).all()  # valid rows first, padding last
        assert ((rows >= start) & (rows < start + s.hist_len[:, None]))[
            valid
        ].all()  # own user, before the sample
        later = rows[:, 1:] > rows[:, :-1]
        assert (later | ~valid[:, 1:]).all()  # chronological
    long, short = np.asarray(hist.rows[60]), np.asarray(hist.rows[10])
    assert all(set(a[a >= 0]) >= set(b[b >= 0]) for a, b in zip(long[::97], short[::97]))  # short within long
    # timeline rows give both the item and the rating of each retrieved behaviour
    row = long[-1][long[-1] >= 0]
    assert tl.item_index[row].shape == tl.rating[row].shape == row.shape


def test_recent_mode_equals_last_k(setup):
    ds = setup["ds"]
    retrieve_histories(setup["data"], mode="recent", ks=(60, 10))
    hist = opened(setup["data"], mode="recent")
    s = read_samples(ds)
    tl = ds.timelines
    for k in (60, 10):
        rows, valid = tl.recent(s.user_index, s.hist_len, k)  # right-aligned; ours are left-aligned
        expected = np.full_like(rows, -1, dtype=np.int32)
        for j in range(k):  # shift each row left by its padding
            pad = k - valid.sum(axis=1)
            src = j + pad
            ok = src < k
            expected[ok, j] = rows[np.flatnonzero(ok), src[ok]]
        np.testing.assert_array_equal(hist.lookup(s.sample_id, k), expected)
    subset = np.arange(0, len(s.sample_id), 211)
    np.testing.assert_array_equal(
        hist.rows[60][subset],
        brute_force(
            tl.item_index, tl.offsets, s.user_index[subset], s.hist_len[subset], None, 60, mode="recent"
        ),
    )


def test_block_sizes_do_not_change_results(setup, monkeypatch):
    """Tiny blocks (many groups, long users cut into many chunks, torch.topk on more rows) give the same rows."""
    ds = setup["ds"]
    s = read_samples(ds)
    tl = ds.timelines
    lengths = np.diff(tl.offsets)
    users = np.concatenate([np.argsort(lengths)[-3:], np.arange(0, len(lengths), 4)])
    pick = np.flatnonzero(np.isin(s.user_index, users))
    vectors = load_index(setup["index"]).vectors()
    hist = opened(setup["data"])
    monkeypatch.setattr(engine, "_TOPK_MIN_COLUMNS", 1000)
    stats = EngineStats()
    small = retrieve_rows(
        tl.item_index, tl.offsets, s.user_index[pick], s.hist_len[pick], vectors, (60, 10),
        block_elements=300_000, gather_elements=3_000_000, row_chunk=64, stats=stats,
    )  # fmt: skip
    assert stats.groups > 100
    for k in (60, 10):
        np.testing.assert_array_equal(small[k], hist.lookup(s.sample_id[pick], k))


def test_outputs_and_sidecar(setup):
    out = setup["data"] / "retrieved" / "similarity"
    assert sorted(p.name for p in out.iterdir()) == [
        "retrieval.json",
        "rows_k10.npy",
        "rows_k60.npy",
        "sample_ids.npy",
    ]
    meta = json.loads((out / "retrieval.json").read_text())
    assert meta["ks"] == [60, 10] and meta["mode"] == "similarity"
    assert meta["index"]["sha256"] == load_index(setup["index"]).sha256
    assert (
        meta["dataset"]["metadata_sha256"]
        == hashlib.sha256((setup["data"] / "metadata.json").read_bytes()).hexdigest()
    )
    assert meta["n_samples"] == setup["ds"].metadata["counts"]["samples"]
    assert "retrieved histories (similarity)" in setup["result"].summary()


def test_load_fails_clearly_for_another_dataset_config_or_index(setup, tmp_path):
    other = tmp_path / "data"
    shutil.copytree(setup["data"], other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["config"]["min_history"] = 10  # as if prepared with another config
    (other / "metadata.json").write_text(json.dumps(meta, indent=2))
    with pytest.raises(RetrievedHistoriesError, match=r"another config.*min_history: 5 -> 10"):
        load_retrieved(setup["data"] / "retrieved" / "similarity", other)
    with pytest.raises(RetrievedHistoriesError, match="holds mode 'similarity'"):
        load_retrieved(setup["data"] / "retrieved" / "similarity", setup["data"], mode="recent")

    emb = load_item_embeddings(setup["emb"])
    pca = fit_pca(emb.vectors, 16)  # same embeddings, another PCA: another index file
    index = build_index(to_index_space(pca, emb.vectors), "flat")
    save_index(tmp_path / "index16", index, pca, make_sidecar(index, pca, emb.meta))
    with pytest.raises(RetrievedHistoriesError, match="retrieved with index sha256"):
        opened(setup["data"], index_sha256=load_index(tmp_path / "index16").sha256)
    with pytest.raises(RetrievedHistoriesError, match="retrieval.json: missing"):
        load_retrieved(tmp_path / "nothing", setup["data"])

    few = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    small_pca = fit_pca(few, 8)
    small = build_index(to_index_space(small_pca, few), "flat")
    save_index(tmp_path / "index10", small, small_pca, make_sidecar(small, small_pca, {"sha256": "x"}))
    with pytest.raises(RetrievalInputError, match="holds 10 items"):
        retrieve_histories(setup["data"], tmp_path / "index10", out_dir=tmp_path / "r")


def test_cli(setup, tmp_path, capsys):
    main = runpy.run_path(str(TOOLS / "retrieve_histories.py"), run_name="cli")["main"]
    assert main(["--processed", str(setup["data"])]) == 2
    assert "needs --index" in capsys.readouterr().err
    assert main(["--processed", str(tmp_path), "--index", str(setup["index"])]) == 2
    assert "not a processed dataset" in capsys.readouterr().err
    assert (
        main(
            ["--processed", str(setup["data"]), "--mode", "recent", "--ks", "5", "--out", str(tmp_path / "r")]
        )
        == 0
    )
    assert "retrieved histories (recent)" in capsys.readouterr().out
    assert np.load(tmp_path / "r" / "rows_k5.npy").shape == (setup["ds"].metadata["counts"]["samples"], 5)

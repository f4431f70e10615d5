"""CRMBatchLoader on the bundled real MovieLens sample, against plain-Python histories built from the timeline."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from reclora_ds.data.histories import NO_ROW, RetrievedHistories, RetrievedHistoriesError
from reclora_ds.data.loader import DEFAULT_RECENT_LENGTH, CRMBatchLoader, uniform_sample_ids
from reclora_ds.data.processed import ProcessedDataset


@pytest.fixture(scope="module")
def ds(ml_small_prepared) -> ProcessedDataset:
    return ProcessedDataset(ml_small_prepared.output_dir)


@pytest.fixture(scope="module")
def reference(ds):
    """Plain Python from the parquet files: user -> [(global position, item_index, rating)], item lookups."""
    timeline = defaultdict(list)
    rows = pq.read_table(ds.path / "timelines.parquet").to_pylist()
    for row_index, r in enumerate(rows):
        timeline[r["user_index"]].append((r["sample_id"], r["item_index"], r["rating"], row_index))
    items = pq.read_table(ds.path / "items.parquet").to_pylist()
    item_id = {r["item_index"]: r["item_id"] for r in items}
    genre_id = {r["item_index"]: r["genre_id"] for r in items}
    return timeline, item_id, genre_id


def split_ids(ds, split):
    return set(ds.read_split(split, ["sample_id"]).column("sample_id").to_pylist())


def collect(loader):
    return [dict(b) for b in loader]


def cat(batches, key):
    return torch.cat([b[key] for b in batches]).numpy()


def test_batch_schema(ds):
    loader = CRMBatchLoader(ds, "valid", batch_size=1000, history_length=60)
    batches = collect(loader)
    assert len(batches) == len(loader) == 10  # 9,779 rows
    assert [len(b["sample_id"]) for b in batches] == [1000] * 9 + [779]
    b = batches[0]
    assert set(b) == {
        "sample_id", "label", "user_id", "item_id", "genre",
        "hist_item", "hist_genre", "hist_rating", "hist_mask", "hist_age", "hist_len",
        "recent_item", "recent_genre", "recent_rating", "recent_mask", "recent_age",
    }  # fmt: skip
    assert b["recent_item"].shape == b["recent_age"].shape == (1000, DEFAULT_RECENT_LENGTH)
    assert b["hist_age"].dtype == b["recent_age"].dtype == torch.int64
    assert "recent_item" not in next(
        iter(CRMBatchLoader(ds, "valid", 10, history_length=60, recent_length=0))
    )
    for key in (
        "sample_id",
        "user_id",
        "item_id",
        "genre",
        "hist_item",
        "hist_genre",
        "hist_rating",
        "hist_len",
    ):
        assert b[key].dtype == torch.int64, key
    assert b["label"].dtype == torch.float32 and b["hist_mask"].dtype == torch.bool
    assert b["hist_item"].shape == b["hist_genre"].shape == b["hist_rating"].shape == (1000, 60)
    assert torch.equal(b["hist_len"], b["hist_mask"].sum(1))
    pad = ~b["hist_mask"]
    assert pad.any() and b["hist_mask"].any()
    for key in ("hist_item", "hist_genre", "hist_rating"):
        assert (b[key][pad] == 0).all() and (b[key][~pad] > 0).all()
    assert b["hist_rating"].max() <= 10
    # right-aligned: once a row has a real item, the rest of the row is real
    assert (b["hist_mask"].int().diff(dim=1) >= 0).all()


@pytest.mark.parametrize(("split", "length"), [("test", 8), ("valid", 60)])
def test_recent_history_equals_plain_python(ds, reference, split, length):
    """hist_* = the last L interactions of the user strictly before the sample in global order."""
    timeline, item_id, genre_id = reference
    samples = ds.read_split(split, ["sample_id", "user_index"]).to_pylist()
    user_of = {s["sample_id"]: s["user_index"] for s in samples}
    recent = 5
    loader = CRMBatchLoader(ds, split, batch_size=4096, history_length=length, recent_length=recent)
    seen_truncated = seen_padded = False
    for batch in loader:
        for k, sid in enumerate(batch["sample_id"].tolist()):
            every = [t for t in timeline[user_of[sid]] if t[0] < sid]  # never at/after the sample
            past = every[-length:]
            pad = [0] * (length - len(past))
            assert batch["hist_item"][k].tolist() == pad + [item_id[t[1]] for t in past]
            assert batch["hist_genre"][k].tolist() == pad + [genre_id[t[1]] for t in past]
            assert batch["hist_rating"][k].tolist() == pad + [round(2 * t[2]) for t in past]
            assert batch["hist_len"][k].item() == len(past)
            # age: how many behaviours back; the last one before the sample is 1
            assert batch["hist_age"][k].tolist() == pad + list(range(len(past), 0, -1))
            short = every[-recent:]  # the short-term window, the same rule with R behaviours
            short_pad = [0] * (recent - len(short))
            assert batch["recent_item"][k].tolist() == short_pad + [item_id[t[1]] for t in short]
            assert batch["recent_genre"][k].tolist() == short_pad + [genre_id[t[1]] for t in short]
            assert batch["recent_rating"][k].tolist() == short_pad + [round(2 * t[2]) for t in short]
            assert batch["recent_age"][k].tolist() == short_pad + list(range(len(short), 0, -1))
            assert batch["recent_mask"][k].tolist() == [False] * len(short_pad) + [True] * len(short)
            seen_truncated |= len(past) == length and len(timeline[user_of[sid]]) > length
            seen_padded |= len(past) < length
    assert seen_truncated and seen_padded


def test_target_fields_match_the_sample_rows(ds):
    loader = CRMBatchLoader(ds, "valid", batch_size=512, shuffle=True, seed=1)
    batches = collect(loader)
    table = ds.read_split("valid").to_pandas().set_index("sample_id")
    ids = cat(batches, "sample_id")
    for key in ("user_id", "item_id", "genre"):
        assert (cat(batches, key) == table.loc[ids, key].to_numpy()).all()
    assert (cat(batches, "label") == table.loc[ids, "label"].to_numpy()).all()


@pytest.mark.parametrize(("world_size", "drop_last"), [(2, False), (3, False), (3, True), (8, False)])
def test_ranks_are_disjoint_and_cover_the_split(ds, world_size, drop_last):
    """8 files: 2 and 8 ranks split by file, 3 ranks by row striding. Equal batch counts on every rank."""
    all_ids = split_ids(ds, "valid")
    per_rank, lengths = [], []
    for rank in range(world_size):
        loader = CRMBatchLoader(
            ds, "valid", 500, rank=rank, world_size=world_size, shuffle=True, seed=7, drop_last=drop_last
        )
        assert loader.by_files == (8 % world_size == 0)
        batches = collect(loader)
        lengths.append([len(b["sample_id"]) for b in batches])
        per_rank.append(cat(batches, "sample_id"))
    assert all(lg == lengths[0] for lg in lengths)  # DDP: same steps, same batch sizes
    sets = [set(ids.tolist()) for ids in per_rank]
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not sets[i] & sets[j]
    union = set().union(*sets)
    if drop_last:
        assert all(lg == 500 for lg in lengths[0]) and union <= all_ids
        assert len(union) == world_size * 500 * len(lengths[0])
    else:
        assert union == all_ids
        # padding repeats only a rank's own samples
        assert sum(len(ids) for ids in per_rank) - len(all_ids) == sum(
            len(ids) - len(set(ids)) for ids in per_rank
        )


def test_by_file_ranks_read_their_files(ds):
    files = ds.split_files("train")
    loader = CRMBatchLoader(ds, "train", 4096, rank=1, world_size=2, even_batches=False)
    want = np.concatenate(
        [pq.read_table(f, columns=["sample_id"])["sample_id"].to_numpy() for f in files[1::2]]
    )
    assert (cat(collect(loader), "sample_id") == want).all()  # unshuffled: files 1, 3, 5, 7 in order


def test_shuffle_is_seeded_and_changes_with_epoch(ds):
    def order(seed, epoch, shuffle=True):
        loader = CRMBatchLoader(ds, "train", 4096, shuffle=shuffle, seed=seed, buffer_rows=20_000)
        loader.set_epoch(epoch)
        return cat(collect(loader), "sample_id")

    a0, a0_again, a1, b0 = order(1, 0), order(1, 0), order(1, 1), order(2, 0)
    assert (a0 == a0_again).all()
    assert not (a0 == a1).all() and not (a0 == b0).all()
    assert sorted(a0) == sorted(a1) == sorted(split_ids(ds, "train"))
    plain = order(1, 0, shuffle=False)
    assert (np.diff(plain) > 0).all()  # the split's own (global time) order


@pytest.mark.parametrize(
    ("rank", "world_size", "buffer_rows", "resume_at"),
    [(0, 1, 20_000, 0), (0, 1, 20_000, 7), (0, 1, 20_000, 19), (2, 3, 2_000, 6), (2, 3, 2_000, 7)],
)
def test_resume_yields_exactly_the_remaining_batches(ds, rank, world_size, buffer_rows, resume_at):
    """Small buffers make batches span files and skipped buffers; rank 2 of 3 pads its last batch."""

    def make():
        return CRMBatchLoader(
            ds, "valid" if world_size > 1 else "train", 4096 if world_size == 1 else 450,
            rank=rank, world_size=world_size, shuffle=True, seed=3, epoch=2, buffer_rows=buffer_rows,
        )  # fmt: skip

    full = collect(make())
    assert resume_at < len(full)
    interrupted = make()
    it = iter(interrupted)
    for _ in range(resume_at):
        next(it)
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches_yielded"], state["seed"]) == (2, resume_at, 3)

    resumed = make()
    resumed.set_epoch(0)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the recipe's epoch loop calls this again: the pending resume is kept
    rest = collect(resumed)
    assert len(rest) == len(full) - resume_at
    for got, want in zip(rest, full[resume_at:]):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert resumed.state_dict()["batches_yielded"] == len(full)
    assert len(collect(resumed)) == len(full)  # a later iteration is a whole epoch again


@pytest.fixture(scope="module")
def uneven_ds(ds, tmp_path_factory) -> ProcessedDataset:
    """The dataset with its valid split rewritten as 2 very uneven shards (9,000 and 779 rows)."""
    out = tmp_path_factory.mktemp("uneven") / "data"
    shutil.copytree(ds.path, out)
    valid = ds.read_split("valid")
    for f in (out / "samples").glob("valid-*.parquet"):
        f.unlink()
    names = ["valid-00000-of-00002.parquet", "valid-00001-of-00002.parquet"]
    pq.write_table(valid.slice(0, 9000), out / "samples" / names[0])
    pq.write_table(valid.slice(9000), out / "samples" / names[1])
    meta = json.loads((out / "metadata.json").read_text())
    meta["shards"]["valid"] = names
    (out / "metadata.json").write_text(json.dumps(meta))
    return ProcessedDataset(out)


@pytest.mark.parametrize("resume_at", [0, 1, 5, 8])
def test_padding_cycles_own_rows_and_resumes_inside_it(uneven_ds, resume_at):
    """Rank 1 holds 779 rows but must run rank 0's 9 batches: it cycles its own rows (shuffled once)."""

    def make():
        return CRMBatchLoader(uneven_ds, "valid", 1000, rank=1, world_size=2, shuffle=True, seed=5)

    full = collect(make())
    assert len(full) == len(CRMBatchLoader(uneven_ds, "valid", 1000, rank=0, world_size=2)) == 9
    ids = cat(full, "sample_id")
    assert len(ids) == 9000 and len(set(ids.tolist())) == 779
    assert (ids == np.resize(ids[:779], 9000)).all()
    interrupted = make()
    it = iter(interrupted)
    for _ in range(resume_at):
        next(it)
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict())
    rest = collect(resumed)
    assert len(rest) == 9 - resume_at
    for got, want in zip(rest, full[resume_at:]):
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_state_dict_checks_settings(ds):
    state = CRMBatchLoader(ds, "valid", 100).state_dict()
    with pytest.raises(ValueError, match="batch_size"):
        CRMBatchLoader(ds, "valid", 200).load_state_dict(state)


def hand_made_retrieval(ds, width=5):
    """For every valid sample: its history positions {0, middle, last} in time order, then NO_ROW padding
    (the retrieval folder layout), as a K=width array."""
    samples = ds.read_split("valid", ["sample_id", "user_index", "hist_len"]).to_pylist()
    offsets = ds.timelines.offsets
    ids, rows = [], []
    for s in sorted(samples, key=lambda s: s["sample_id"]):
        start, n = int(offsets[s["user_index"]]), s["hist_len"]
        chosen = sorted({start, start + n // 2, start + n - 1})
        ids.append(s["sample_id"])
        rows.append(chosen + [NO_ROW] * (width - len(chosen)))
    return np.array(ids), np.array(rows, dtype=np.int32)


def in_memory(ids, rows):
    return RetrievedHistories(ids, {rows.shape[1]: rows}, {"mode": "similarity"})


def test_retrieved_histories_are_laid_out_in_time_order(ds):
    ids, rows = hand_made_retrieval(ds)
    items = ds.items.column("item_id").to_numpy()
    by_id = dict(zip(ids.tolist(), rows.tolist()))
    loader = CRMBatchLoader(
        ds, "valid", 1000, history_length=5, history_mode="retrieved", retrieved=in_memory(ids, rows)
    )
    batch = next(iter(loader))
    row_of = {int(s): r for r, s in enumerate(ds.timelines.sample_id.tolist())}  # a sample's own row
    for k, sid in enumerate(batch["sample_id"].tolist()):
        chosen = [r for r in by_id[sid] if r != NO_ROW]  # plain Python: right-aligned, oldest first
        expected = [0] * (5 - len(chosen)) + [int(items[ds.timelines.item_index[r]]) for r in chosen]
        assert batch["hist_item"][k].tolist() == expected
        assert batch["hist_rating"][k].tolist()[-len(chosen) :] == [
            round(2 * float(ds.timelines.rating[r])) for r in chosen
        ]
        # age in behaviours: the sample's own timeline row minus the behaviour's row, found by search
        own = row_of[sid]
        assert batch["hist_age"][k].tolist() == [0] * (5 - len(chosen)) + [own - r for r in chosen]
    assert torch.equal(batch["hist_len"], batch["hist_mask"].sum(1))


def test_retrieved_errors(ds):
    with pytest.raises(ValueError, match="needs `retrieved`"):
        CRMBatchLoader(ds, "valid", 100, history_mode="retrieved")
    ids, rows = hand_made_retrieval(ds)
    with pytest.raises(RetrievedHistoriesError, match=r"holds K in \[5\], not 4"):
        CRMBatchLoader(
            ds, "valid", 100, history_length=4, history_mode="retrieved", retrieved=in_memory(ids, rows)
        )
    with pytest.raises(KeyError, match="lacks 1 sample ids"):
        CRMBatchLoader(
            ds,
            "valid",
            100,
            history_length=5,
            history_mode="retrieved",
            retrieved=in_memory(ids[1:], rows[1:]),
        )
    leaky = rows.copy()
    leaky[0, 2] = leaky[0, 2] + 1  # the sample's own row (position hist_len): not history
    loader = CRMBatchLoader(
        ds, "valid", 100, history_length=5, history_mode="retrieved", retrieved=in_memory(ids, leaky)
    )
    with pytest.raises(ValueError, match="outside the sample's history"):
        collect(loader)


@pytest.mark.parametrize("n", [1, 37, 500])
def test_uniform_eval_subset_is_the_same_for_any_world_size(ds, n):
    """A seeded uniform subset: the same ids whatever the world size, read once each across the ranks."""
    all_ids = np.sort(ds.read_split("valid", ["sample_id"]).column("sample_id").to_numpy())
    subset = uniform_sample_ids(ds, "valid", n, seed=7)
    assert len(subset) == min(n, len(all_ids)) and np.isin(subset, all_ids).all()
    assert len(np.unique(subset)) == len(subset)
    assert np.array_equal(subset, uniform_sample_ids(ds, "valid", n, seed=7))
    assert n >= len(all_ids) or not np.array_equal(subset, uniform_sample_ids(ds, "valid", n, seed=8))
    for world_size in (1, 2, 3):
        seen = []
        for rank in range(world_size):
            loader = CRMBatchLoader(
                ds, "valid", 16, sample_ids=subset, rank=rank, world_size=world_size, even_batches=False
            )
            ids = (
                np.concatenate([b["sample_id"].numpy() for b in loader])
                if len(loader)
                else np.zeros(0, np.int64)
            )
            assert len(ids) == loader.num_samples
            seen.append(ids)
        union = np.concatenate(seen)
        assert np.array_equal(np.sort(union), subset)  # disjoint and complete


def test_uniform_eval_subset_is_uniform_over_the_split(ds):
    """Not the start of the (time-ordered) split: the subset's mean position is near the middle."""
    all_ids = np.sort(ds.read_split("valid", ["sample_id"]).column("sample_id").to_numpy())
    position = np.searchsorted(all_ids, uniform_sample_ids(ds, "valid", 400, seed=0)) / len(all_ids)
    assert abs(position.mean() - 0.5) < 0.05  # sd of the mean of 400 uniforms: 0.0144
    assert position.min() < 0.05 and position.max() > 0.95


def test_subset_with_unknown_ids_is_an_error(ds):
    with pytest.raises(ValueError, match="1 of the 2 requested sample ids are not in split 'valid'"):
        CRMBatchLoader(ds, "valid", 16, sample_ids=np.array([-5, uniform_sample_ids(ds, "valid", 1, 0)[0]]))

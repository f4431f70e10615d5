"""The recipe: raw interactions -> globally ordered timelines, samples, 8:1:1 split, vocabularies, few-shot.

All steps are vectorised numpy over whole columns (no Python loop over rows), so ML-25M's 25M rows fit the
benchmark's budget (``benchmarks/bench_prepare.py``).

1. Rows whose item (user) is missing from the item (user) metadata are dropped (``unknown_item``/``unknown_user``).
2. Stable global order by (timestamp, user, item); exact duplicates of (user, item, timestamp) keep the
   first row in file order (``duplicate_row``). Re-ratings (the same user and item at another time) keep
   only the latest row (``rerated_pair``; ``strict`` rejects them): see :func:`drop_rerated`.
3. Optional k-core: repeat {drop users and items with fewer than k rows} until nothing changes (``kcore``).
4. Each user's timeline = that user's rows in global order. A row's ``hist_len`` = its position in the
   timeline = the number of the same user's earlier rows; its history is ``timeline[:hist_len]``, so no
   history item comes at or after its sample.
5. Rows with ``hist_len >= min_history`` are samples; the others stay in the timelines as history only
   (``history_only``). For ML-1M this gives 1,000,209 - 5 x 6,040 = 970,009 samples, Table 1's count.
6. Samples are split by global order: the first 80% train, the next 10% valid, the last 10% test.
7. Categorical features are encoded with vocabularies built from the **train era** (every kept row up to
   and including the last training sample, histories included): id 0 = padding, 1 = out of vocabulary,
   2.. = values seen in the train era, sorted. Users, items and values first seen later map to 1.
8. A fixed uniform few-shot subset of train sample ids is drawn with the config's seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reclora_ds.batch import OOV_ID
from reclora_ds.data.errors import DropLog, PrepareSettingsError
from reclora_ds.data.raw.base import RawData, RawInteractions
from reclora_ds.data.specs import DatasetSpec

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


@dataclass
class Vocab:
    """Sorted known values of one categorical field; ``encode`` maps unknown values to OOV_ID."""

    values: np.ndarray  # sorted unique known values (ints or strings)

    @property
    def size(self) -> int:
        return len(self.values) + 2

    def encode(self, raw: np.ndarray) -> np.ndarray:
        if len(self.values) == 0:
            return np.full(len(raw), OOV_ID, dtype=np.int32)
        pos = np.searchsorted(self.values, raw)
        pos_clipped = np.minimum(pos, len(self.values) - 1)
        hit = self.values[pos_clipped] == raw
        return np.where(hit, pos_clipped + 2, OOV_ID).astype(np.int32)

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Inverse of encode for known ids; PAD and OOV decode to None."""
        out = np.empty(len(ids), dtype=object)
        known = ids >= 2
        out[known] = self.values[ids[known] - 2]
        out[~known] = None
        return out


@dataclass
class Prepared:
    """The processed dataset in memory (global order = index into the ``*_g`` arrays).

    Global arrays (one entry per kept interaction, in (timestamp, user, item) order):
        user_index_g, item_index_g: dense 0-based indices into ``users_raw`` / ``items_raw``.
        rating_g (float32), timestamp_g (int64), label_g (int8), hist_len_g (int32).
    Samples: ``sample_ids`` (int64, ascending global positions with hist_len >= min_history),
        split at ``bounds`` = (n_train, n_train + n_valid, n).
    Timelines (user-major CSR): ``timeline_order`` (global positions sorted by user then time),
        ``timeline_offsets`` (int64 [n_users + 1]).
    Tables: ``items`` / ``users`` (Arrow, one row per dense index, with encoded feature columns).
    """

    user_index_g: np.ndarray
    item_index_g: np.ndarray
    rating_g: np.ndarray
    timestamp_g: np.ndarray
    label_g: np.ndarray
    hist_len_g: np.ndarray
    sample_ids: np.ndarray
    bounds: tuple[int, int, int]
    timeline_order: np.ndarray
    timeline_offsets: np.ndarray
    items: pa.Table
    users: pa.Table
    vocabs: dict[str, Vocab]
    fewshot_ids: np.ndarray
    train_era_end: int

    def split_ids(self, split: str) -> np.ndarray:
        lo, hi = {"train": (0, self.bounds[0]), "valid": self.bounds[:2], "test": self.bounds[1:]}[split]
        return self.sample_ids[lo:hi]


def drop_unknown_ids(raw: RawData, drops: DropLog) -> RawInteractions:
    """Drop rows whose item (or user, when a user file exists) is not in the metadata."""
    inter = raw.interactions
    known = np.isin(inter.item, raw.items.column("item").to_numpy())
    drops.add_mask("unknown_item", ~known, inter.file, inter.line, raw.file_names)
    if raw.users is not None:
        known_user = np.isin(inter.user, raw.users.column("user").to_numpy())
        drops.add_mask("unknown_user", known & ~known_user, inter.file, inter.line, raw.file_names)
        known &= known_user
    return inter if known.all() else inter.select(known)


def global_order(inter: RawInteractions, drops: DropLog, names: list[str]) -> RawInteractions:
    """Stable sort by (timestamp, user, item); drop exact (user, item, timestamp) repeats after the first."""
    order = np.lexsort((inter.item, inter.user, inter.timestamp))  # last key is the primary one; stable
    inter = inter.select(order)
    dup = np.zeros(len(inter), dtype=bool)
    if len(inter) > 1:
        dup[1:] = (
            (inter.timestamp[1:] == inter.timestamp[:-1])
            & (inter.user[1:] == inter.user[:-1])
            & (inter.item[1:] == inter.item[:-1])
        )
    drops.add_mask("duplicate_row", dup, inter.file, inter.line, names)
    inter = inter if not dup.any() else inter.select(~dup)
    return drop_rerated(inter, drops, names)


def drop_rerated(inter: RawInteractions, drops: DropLog, names: list[str]) -> RawInteractions:
    """Re-rating policy: of the rows of one (user, item) pair, keep only the latest in global order.

    ``inter`` is in global (timestamp, user, item) order without exact repeats, so the latest row of a pair
    is its last one here (a later timestamp). The earlier rows are dropped as ``rerated_pair`` (counted;
    ``strict`` turns the first into an error), so no sample's history holds its own item and each pair is
    one sample whose label is the user's final opinion.
    """
    if len(inter) < 2:
        return inter
    pos = np.arange(len(inter))
    order = np.lexsort((pos, inter.item, inter.user))  # by pair, then global position
    u, i = inter.user[order], inter.item[order]
    later_same = np.zeros(len(inter), dtype=bool)
    later_same[:-1] = (u[1:] == u[:-1]) & (i[1:] == i[:-1])  # a later row of the same pair follows
    earlier = np.zeros(len(inter), dtype=bool)
    earlier[order[later_same]] = True
    drops.add_mask("rerated_pair", earlier, inter.file, inter.line, names)
    return inter if not earlier.any() else inter.select(~earlier)


def kcore_filter(inter: RawInteractions, k: int, drops: DropLog, names: list[str]) -> RawInteractions:
    """Iteratively keep users and items with at least ``k`` rows (no-op for k <= 1)."""
    if k <= 1 or len(inter) == 0:
        return inter
    _, u = np.unique(inter.user, return_inverse=True)
    _, i = np.unique(inter.item, return_inverse=True)
    keep = np.ones(len(inter), dtype=bool)
    while True:
        ucount = np.bincount(u[keep], minlength=u.max() + 1)
        icount = np.bincount(i[keep], minlength=i.max() + 1)
        new_keep = keep & (ucount[u] >= k) & (icount[i] >= k)
        if new_keep.sum() == keep.sum():
            break
        keep = new_keep
    drops.add_mask("kcore", ~keep, inter.file, inter.line, names)
    return inter if keep.all() else inter.select(keep)


# Ids below this use a lookup table for dense indexing (linear time); larger ones fall back to np.unique.
MAX_LOOKUP_ID = 64_000_000


def dense_index(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique values, int32 index of each value into them), like ``np.unique(return_inverse=True)``.

    Raw MovieLens/GoodReads ids are small non-negative ints, so a presence table + cumsum replaces the
    O(n log n) sort of np.unique (about 20 s less on ML-25M's 25M rows).
    """
    if len(values) and values.min() >= 0 and values.max() < MAX_LOOKUP_ID:
        present = np.zeros(int(values.max()) + 1, dtype=bool)
        present[values] = True
        rank = np.cumsum(present, dtype=np.int64) - 1
        return np.flatnonzero(present).astype(values.dtype), rank[values].astype(np.int32)
    uniques, inverse = np.unique(values, return_inverse=True)
    return uniques, inverse.astype(np.int32)


def user_positions(user_index: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row position within its user's timeline, plus the user-major CSR (order, offsets).

    ``user_index`` must already be in global order; a stable sort by user keeps time order inside a user.
    """
    timeline_order = np.argsort(user_index, kind="stable")
    counts = np.bincount(user_index, minlength=n_users)
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    position = np.empty(len(user_index), dtype=np.int32)
    position[timeline_order] = np.arange(len(user_index), dtype=np.int64) - np.repeat(offsets[:-1], counts)
    return position, timeline_order, offsets


def split_bounds(n: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """(n_train, n_train + n_valid, n) for an 8:1:1-style split of ``n`` ordered samples."""
    n_train = int(n * fractions[0])
    n_train_valid = int(n * (fractions[0] + fractions[1]))
    return n_train, n_train_valid, n


def _string_column(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    return pc.fill_null(col, "").to_numpy(zero_copy_only=False).astype(str)


def encode_table(
    table: pa.Table, key_values: np.ndarray, in_train_era: np.ndarray, key_name: str, fields: tuple[str, ...]
) -> tuple[pa.Table, dict[str, Vocab]]:
    """Add encoded columns ``<key_name>`` (e.g. item_id) and one per field to a dense-index table.

    ``table`` rows are aligned with the dense index; ``in_train_era`` marks rows seen in the train era,
    whose values form the vocabularies.
    """
    vocabs = {key_name: Vocab(np.sort(key_values[in_train_era]))}
    columns = {key_name: pa.array(vocabs[key_name].encode(key_values))}
    for field in fields:
        raw = _string_column(table, field)
        vocab = Vocab(np.unique(raw[in_train_era]))
        vocabs[field] = vocab
        columns[f"{field}_id"] = pa.array(vocab.encode(raw))
    for name, col in columns.items():
        table = table.append_column(name, col)
    return table, vocabs


def _aligned_metadata(
    table: pa.Table | None, key: str, keys: np.ndarray, fields: tuple[str, ...], extra: tuple[str, ...]
) -> pa.Table:
    """Rows of ``table`` aligned to ``keys`` (sorted dense raw ids); missing tables give empty strings."""
    columns: dict[str, pa.Array] = {}
    if table is None:
        for f in (*extra, *fields):
            columns[f] = pa.array([""] * len(keys), pa.string())
        return pa.table(columns)
    ids = table.column(key).to_numpy()
    order = np.argsort(ids, kind="stable")
    pos = order[np.searchsorted(ids[order], keys)]
    taken = table.take(pa.array(pos))
    for f in (*extra, *fields):
        columns[f] = (
            pc.fill_null(taken.column(f), "") if f in taken.column_names else pa.array([""] * len(keys))
        )
    return pa.table(columns)


def _drop_summary(drops: DropLog) -> str:
    return (
        ", ".join(
            f"{r}: {d['count']} (e.g. {', '.join(d['examples'][:2])})" for r, d in drops.to_json().items()
        )
        or "none"
    )


def prepare(
    raw: RawData,
    spec: DatasetSpec,
    *,
    min_history: int,
    kcore: int,
    split: tuple[float, float, float],
    few_shot_size: int,
    seed: int,
) -> Prepared:
    """Run the whole recipe on a reader's output; drops are added to ``raw.drops``."""
    drops, names = raw.drops, raw.file_names
    inter = drop_unknown_ids(raw, drops)
    inter = global_order(inter, drops, names)
    if len(inter) == 0:
        raise PrepareSettingsError(
            "raw_dir", f"no interaction is usable; dropped rows by reason: {_drop_summary(drops)}"
        )
    before_kcore = len(inter)
    inter = kcore_filter(inter, kcore, drops, names)
    if len(inter) == 0:
        raise PrepareSettingsError(
            "kcore",
            f"kcore={kcore} removes all {before_kcore:,} interactions (no user and item keep {kcore} rows "
            "each); lower it, or 0 for no k-core",
        )

    users_raw, user_index = dense_index(inter.user)
    items_raw, item_index = dense_index(inter.item)
    hist_len, timeline_order, offsets = user_positions(user_index, len(users_raw))

    is_sample = hist_len >= min_history
    drops.add_mask("history_only", ~is_sample, inter.file, inter.line, names)
    sample_ids = np.flatnonzero(is_sample).astype(np.int64)
    bounds = split_bounds(len(sample_ids), split)
    if len(sample_ids) == 0:
        longest = int(hist_len.max()) if len(hist_len) else 0
        raise PrepareSettingsError(
            "min_history",
            f"min_history={min_history} leaves no sample: the longest user timeline has {longest + 1} rows, "
            f"so at most min_history={longest} gives one",
        )
    if min(bounds[0], bounds[1] - bounds[0], bounds[2] - bounds[1]) == 0:
        raise PrepareSettingsError(
            "split",
            f"{len(sample_ids)} samples (min_history={min_history}) are too few for split={list(split)}: "
            f"it gives {bounds[0]} train, {bounds[1] - bounds[0]} valid, {bounds[2] - bounds[1]} test rows, "
            "and every split needs at least one",
        )
    train_era_end = int(sample_ids[bounds[0] - 1])

    user_seen = np.zeros(len(users_raw), dtype=bool)
    user_seen[user_index[: train_era_end + 1]] = True
    item_seen = np.zeros(len(items_raw), dtype=bool)
    item_seen[item_index[: train_era_end + 1]] = True

    items = _aligned_metadata(raw.items, "item", items_raw, spec.item_fields, ("title", "genres"))
    items = pa.table(
        {"item_index": pa.array(np.arange(len(items_raw), dtype=np.int32)), "item": pa.array(items_raw)}
        | {c: items.column(c) for c in items.column_names}
    )
    descriptions = [
        spec.description.format(**row) for row in items.select(["title", *spec.item_fields]).to_pylist()
    ]
    items = items.append_column("description", pa.array(descriptions, pa.string()))
    items, item_vocabs = encode_table(items, items_raw, item_seen, "item_id", spec.item_fields)

    users = _aligned_metadata(raw.users, "user", users_raw, spec.user_fields, ())
    users = pa.table(
        {
            "user_index": pa.array(np.arange(len(users_raw), dtype=np.int32)),
            "user": pa.array(users_raw),
            "timeline_offset": pa.array(offsets[:-1]),
            "timeline_length": pa.array(np.diff(offsets)),
        }
        | {c: users.column(c) for c in users.column_names}
    )
    if raw.user_keys is not None:
        users = users.append_column(
            "user_key", pa.array(np.asarray(raw.user_keys, dtype=object)[users_raw], pa.string())
        )
    users, user_vocabs = encode_table(users, users_raw, user_seen, "user_id", spec.user_fields)

    rng = np.random.default_rng(seed)
    train_ids = sample_ids[: bounds[0]]
    fewshot_ids = np.sort(rng.choice(train_ids, size=min(few_shot_size, len(train_ids)), replace=False))

    return Prepared(
        user_index_g=user_index,
        item_index_g=item_index,
        rating_g=inter.rating,
        timestamp_g=inter.timestamp,
        label_g=spec.labels(inter.rating),
        hist_len_g=hist_len,
        sample_ids=sample_ids,
        bounds=bounds,
        timeline_order=timeline_order,
        timeline_offsets=offsets,
        items=items,
        users=users,
        vocabs={**user_vocabs, **item_vocabs},
        fewshot_ids=fewshot_ids,
        train_era_end=train_era_end,
    )

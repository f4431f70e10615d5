"""Vectorised CRM batches from a processed dataset: shard files per rank, in-memory shuffle, history gathers.

A batch is built with numpy fancy indexing over whole columns (no Python loop over rows), so assembling
it costs far less than a CRM step (``benchmarks/bench_loader.py``). ``datasets`` streaming row by row is
two orders of magnitude slower (machine-facts) and is not used here.

Shape legend: B batch, L ``history_length``, K retrieved rows per sample in a retrieval file.

A batch (dict of CPU tensors)::

    sample_id   int64   [B]      joins the ID view with the text view and de-duplicates gathered predictions
    label       float32 [B]
    <field>     int64   [B]      one per categorical field of metadata["fields"] (user_id, item_id, genre, ...)
    hist_item   int64   [B, L]   encoded item_id of each history item, PAD_ID (0) where there is none
    hist_<f>    int64   [B, L]   encoded item field f of each history item (hist_genre, ...), 0 = pad
    hist_rating int64   [B, L]   rating bucket round(2 * rating): 1..10 for 0.5..5 stars, 0 = pad
    hist_mask   bool    [B, L]   True on real history items
    hist_age    int64   [B, L]   how many behaviours ago each history item is: 1 = the sample's previous
                                 interaction, hist_len = its first one; 0 = pad (:data:`HIST_AGE`)
    hist_len    int64   [B]      number of real history items (hist_mask.sum(1)), at most L
    recent_item, recent_<f>, recent_rating, recent_mask, recent_age   [B, R]
                                 the R most recent behaviours (``recent_length``, default 20) laid out
                                 like ``hist_*``, in every history mode: SIM's short-term window beside
                                 its retrieved long-term top-K

Histories are laid out oldest first and right-aligned: the most recent item is at position L - 1 and the
padding is on the left. ``hist_age`` gives each behaviour its distance from the sample in the user's
timeline (the position gap, which every dataset has; GoodReads csv timestamps are only an order): with
``recent`` it is ``L - j`` at position j of a full window, with ``retrieved`` it is what the retrieval's
time order alone cannot tell (SIM's exact search unit embeds this interval, Pi et al. 2020 §4.2).
``history_mode="recent"`` takes the last L interactions strictly before the
sample (``Timelines.recent``); ``"retrieved"`` takes the sample's ``rows_k<L>`` of a retrieval folder
(:class:`reclora_ds.data.histories.RetrievedHistories`: the L most similar behaviours of its whole prior
history, in time order), laid out the same way.

``sample_ids`` restricts a loader to a subset of the split (e.g. :func:`uniform_sample_ids`, a seeded
uniform evaluation subset): the subset is fixed by the ids, not by the ranks, so any world size evaluates
the same samples.

Ranks and epochs:
    * The split's shard files are divided between ranks: with ``n_files % world_size == 0`` rank r reads
      files r, r + W, ... (disjoint, together the split). Otherwise every rank reads every file and keeps
      the rows whose position in the split (files in name order) is r modulo W (row striding: same
      partition property, W times the reading).
    * Each epoch the rank's files are shuffled (seed, epoch), grouped into buffers of at least
      ``buffer_rows`` rows (whole files), and each buffer's rows are shuffled in memory (seed, epoch, buffer).
    * ``even_batches`` (default) makes every rank yield the same number of batches of the same sizes, as
      DDP needs: with ``drop_last`` every rank stops at the smallest rank's full batches; without it,
      shorter ranks repeat their first rows of the epoch up to the longest rank's count (like
      ``DistributedSampler``; the metrics de-duplicate by ``sample_id``).
    * ``state_dict()`` records (epoch, batches yielded, seed); after ``load_state_dict`` the next
      iteration yields exactly the remaining batches of that epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from reclora_ds.batch import PAD_ID, RATING_SCALE, RECENT_PREFIX, history_key
from reclora_ds.data.histories import NO_ROW, RetrievedHistories
from reclora_ds.data.processed import ProcessedDataset, feature_columns

log = logging.getLogger(__name__)

HISTORY_MODES = ("recent", "retrieved")
DEFAULT_RECENT_LENGTH = 20  # R: the short-term window every batch carries (SIM's short-term interest)
DEFAULT_BUFFER_ROWS = 1 << 21  # rows shuffled together in memory (whole files)
SAMPLE_COLUMNS = ("sample_id", "label", "user_index", "hist_len")


class CRMBatchLoader:
    """Iterable of CRM batches (dicts of tensors, see the module docstring) for one rank and split.

    Args:
        dataset: the processed dataset.
        split: ``train``, ``valid``, ``test`` or ``fewshot``.
        batch_size: B, samples per batch on this rank.
        history_length: L, history positions per sample.
        history_mode: ``"recent"`` (last L before the sample) or ``"retrieved"`` (from ``retrieved``).
        retrieved: the retrieval folder's histories (:func:`reclora_ds.data.histories.load_retrieved`);
            required for ``"retrieved"``, and L must be one of its K values.
        sample_ids: when given, only these samples of the split (each must be in it).
        rank, world_size: this process's place; defaults to a single process.
        shuffle: shuffle file order and rows each epoch (train); False keeps the split's order.
        seed: base of every shuffle (non-negative).
        epoch: the epoch the first iteration yields (see :meth:`set_epoch`).
        drop_last: drop the last incomplete batch.
        even_batches: every rank yields the same number of batches (needed under DDP).
        recent_length: R, the most recent behaviours every batch also carries as ``recent_*`` (the
            short-term window of SIM, whatever ``history_mode`` is); 0 = none.
        buffer_rows: whole files are read together until a buffer holds at least this many rows;
            rows are shuffled within a buffer (memory: about 40 bytes per row).

    Example::

        loader = CRMBatchLoader(ProcessedDataset(path), "train", 1024, rank=info.rank,
                                world_size=info.world_size, shuffle=True, seed=42)
        for epoch in range(start_epoch, epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                ...
    """

    def __init__(
        self,
        dataset: ProcessedDataset,
        split: str,
        batch_size: int,
        history_length: int = 60,
        history_mode: str = "recent",
        retrieved: RetrievedHistories | None = None,
        sample_ids: np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        even_batches: bool = True,
        buffer_rows: int = DEFAULT_BUFFER_ROWS,
        recent_length: int = DEFAULT_RECENT_LENGTH,
    ):
        if batch_size < 1 or history_length < 1:
            raise ValueError(
                f"batch_size and history_length must be >= 1, got {batch_size}, {history_length}"
            )
        if history_mode not in HISTORY_MODES:
            raise ValueError(f"history_mode must be one of {HISTORY_MODES}, got {history_mode!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
        if recent_length < 0:
            raise ValueError(f"recent_length must be >= 0, got {recent_length}")
        self.recent_length = recent_length
        self.dataset = dataset
        self.split = split
        self.batch_size = batch_size
        self.history_length = history_length
        self.history_mode = history_mode
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.drop_last = drop_last
        self.even_batches = even_batches
        self.buffer_rows = max(1, buffer_rows)

        self.fields = feature_columns(dataset.metadata)
        self._columns = list(dict.fromkeys([*SAMPLE_COLUMNS, *self.fields]))
        self.files = dataset.split_files(split)
        self._file_rows = np.array([pq.ParquetFile(f).metadata.num_rows for f in self.files], dtype=np.int64)
        self._subset_rows: list[np.ndarray] | None = None  # per file: local positions of the subset's rows
        self._subset_ids = None if sample_ids is None else np.unique(np.asarray(sample_ids, dtype=np.int64))
        if sample_ids is not None:
            self._subset_rows = self._locate(np.asarray(sample_ids, dtype=np.int64))
            self._subset_before = np.cumsum([0] + [len(r) for r in self._subset_rows])[:-1]
        self.by_files = sample_ids is None and len(self.files) % world_size == 0
        rank_rows = [self._rows_in_files(r, range(len(self.files))) for r in range(world_size)]
        n_rank = rank_rows[rank]
        if even_batches:
            per_rank = min(rank_rows) // batch_size * batch_size if drop_last else max(rank_rows)
        else:
            per_rank = n_rank // batch_size * batch_size if drop_last else n_rank
        if per_rank > 0 and n_rank == 0:
            raise ValueError(f"rank {rank} of {world_size} gets no sample of split {split!r}")
        self.num_samples = per_rank  # rows this rank yields per epoch, padding included
        self._rank_rows = n_rank

        self._build_lookups()
        self._retrieved: RetrievedHistories | None = None
        if history_mode == "retrieved":
            if not isinstance(retrieved, RetrievedHistories):
                raise ValueError(
                    "history_mode='retrieved' needs `retrieved` (reclora_ds.data.histories.load_retrieved)"
                )
            retrieved.require_k(history_length)
            self._retrieved = retrieved
            self.check_covered(retrieved, history_length)

        self._batches_yielded = 0
        self._resume_from: int | None = None

    # ------------------------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------------------------

    def _build_lookups(self) -> None:
        """Per-item field tables and per-timeline-row arrays, each with one extra PAD entry at the end."""
        meta_fields = self.dataset.metadata["fields"]
        items = self.dataset.items
        n_items = items.num_rows
        self._item_tables: dict[str, np.ndarray] = {}
        for field in self.fields:
            if meta_fields[field]["source"] != "item":
                continue
            name = history_key(field)
            ids = items.column(meta_fields[field]["column"]).to_numpy().astype(np.int64)
            self._item_tables[name] = np.append(ids, PAD_ID)  # [n_items + 1]; index n_items = pad
        tl = self.dataset.timelines
        n_rows = len(tl.item_index)
        self._pad_row = n_rows
        self._tl_item = np.append(tl.item_index.astype(np.int64), n_items)  # [N + 1] -> pad item
        self._tl_rating = np.append(np.rint(tl.rating * RATING_SCALE).astype(np.int8), 0)  # [N + 1]
        self._offsets = tl.offsets

    def check_covered(self, retrieved: RetrievedHistories, k: int) -> None:
        """Every sample this loader can yield has ``rows_k<k>`` in ``retrieved`` (KeyError naming the rest)."""
        ids = self._subset_ids if self._subset_ids is not None else split_sample_ids(self.dataset, self.split)
        retrieved.lookup(ids, k)

    def _locate(self, sample_ids: np.ndarray) -> list[np.ndarray]:
        """Per file, the ascending local positions of the rows whose sample_id is in ``sample_ids``."""
        wanted = np.unique(sample_ids)
        found, rows = 0, []
        for f in self.files:
            ids = pq.read_table(f, columns=["sample_id"]).column("sample_id").to_numpy()
            rows.append(np.flatnonzero(np.isin(ids, wanted)))
            found += len(rows[-1])
        if found != len(wanted):
            raise ValueError(
                f"{len(wanted) - found} of the {len(wanted)} requested sample ids are not in split {self.split!r}"
            )
        return rows

    def _positions(self, file_index: int, rank: int) -> slice | np.ndarray:
        """Local row positions of file ``file_index`` that ``rank`` reads.

        Whole files per rank (``by_files``), row striding (row ``i`` of the split goes to rank ``i % W``),
        or, for a ``sample_ids`` subset, striding over the subset's rows in split order.
        """
        W = self.world_size
        if self._subset_rows is not None:
            first = int(self._subset_before[file_index])  # the file's first subset row, in split order
            return self._subset_rows[file_index][(rank - first) % W :: W]
        if self.by_files:
            return slice(None) if file_index % W == rank else slice(0, 0)
        start = int(self._file_rows[:file_index].sum())  # the file's first row in the split
        return slice((rank - start) % W, None, W)

    def _rows_in_files(self, rank: int, file_indices: Any) -> int:
        """Rows of ``rank`` within the given files (canonical file indices)."""
        total = 0
        for f in file_indices:
            pos = self._positions(f, rank)
            total += len(pos) if isinstance(pos, np.ndarray) else len(range(int(self._file_rows[f]))[pos])
        return total

    # ------------------------------------------------------------------------------------------------------
    # Epochs and position
    # ------------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Batches this rank yields per epoch."""
        return math.ceil(self.num_samples / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields (changes the shuffle); a pending resume of the same
        epoch is kept, one of another epoch is dropped."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._resume_from = None
            self._batches_yielded = 0

    def state_dict(self) -> dict[str, Any]:
        """Data position: epoch, batches already yielded in it, seed (plus settings checked on load)."""
        return {
            "epoch": self.epoch,
            "batches_yielded": self._batches_yielded,
            "seed": self.seed,
            "split": self.split,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "num_batches": len(self),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position: the next iteration yields the batches of ``state["epoch"]`` after the first
        ``state["batches_yielded"]``. The split, batch size, world size and shuffle flag must match (they
        define the order); the seed is taken from the state."""
        for key in ("split", "batch_size", "world_size", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r}, this loader {getattr(self, key)!r}")
        done = int(state["batches_yielded"])
        if not 0 <= done <= len(self):
            raise ValueError(f"loader state has {done} batches yielded of an epoch of {len(self)}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._batches_yielded = done
        self._resume_from = done

    def _epoch_buffers(self, epoch: int) -> list[list[int]]:
        """This rank's files for the epoch, in read order, grouped into shuffle buffers."""
        mine = [f for f in range(len(self.files)) if not self.by_files or f % self.world_size == self.rank]
        if self.shuffle:
            mine = [mine[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(mine))]
        buffers: list[list[int]] = [[]]
        rows = 0
        for f in mine:
            if rows >= self.buffer_rows:
                buffers.append([])
                rows = 0
            buffers[-1].append(f)
            rows += self._rows_in_files(self.rank, [f])
        return [b for b in buffers if b]

    def _read_buffer(self, epoch: int, index: int, files: list[int]) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {c: [] for c in self._columns}
        for f in files:
            table = pq.read_table(self.files[f], columns=self._columns, memory_map=True)
            keep = self._positions(f, self.rank)
            for c in self._columns:
                parts[c].append(table.column(c).to_numpy()[keep])
        cols = {c: np.concatenate(v) for c, v in parts.items()}
        cols["label"] = cols["label"].astype(np.float32)
        for c in ("sample_id", "hist_len", "user_index", *self.fields):
            cols[c] = cols[c].astype(np.int64)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch, index]).permutation(len(cols["sample_id"]))
            cols = {c: v[perm] for c, v in cols.items()}
        return cols

    def _row_chunks(self, epoch: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
        """The epoch's rows for this rank after the first ``skip``, in order, as column chunks; buffers that
        lie wholly inside the skipped part are not read. Padding rows (even batches) come last."""
        want = self.num_samples - skip
        first_rows: dict[str, np.ndarray] | None = None  # the epoch's first rows, for padding
        pad = max(0, self.num_samples - self._rank_rows)
        position = 0
        for index, files in enumerate(self._epoch_buffers(epoch)):
            if want <= 0:
                return
            n = self._rows_in_files(self.rank, files)
            if position + n <= skip and not (pad and index == 0):
                position += n
                continue
            cols = self._read_buffer(epoch, index, files)
            if index == 0 and pad:
                first_rows = {c: v[:pad] for c, v in cols.items()}
            lo = max(0, skip - position)
            position += n
            if lo >= n:
                continue
            chunk = {c: v[lo : lo + want] for c, v in cols.items()}
            want -= len(chunk["sample_id"])
            yield chunk
        if want > 0:  # even_batches padding: the epoch's first rows again (cycled if there are too few)
            assert first_rows is not None
            have = len(first_rows["sample_id"])
            offset = max(0, skip - self._rank_rows)  # padding rows already yielded before a resume
            idx = np.arange(offset, offset + want) % have
            yield {c: v[idx] for c, v in first_rows.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        start = self._resume_from if self._resume_from is not None else 0
        self._resume_from = None
        self._batches_yielded = start
        epoch, b = self.epoch, self.batch_size
        pending: list[dict[str, np.ndarray]] = []
        n_pending = 0
        for chunk in self._row_chunks(epoch, start * b):
            n = len(chunk["sample_id"])
            lo = 0
            if n_pending:  # complete the batch begun in the previous chunk
                lo = min(b - n_pending, n)
                pending.append({c: v[:lo] for c, v in chunk.items()})
                n_pending += lo
                if n_pending < b:
                    continue
                merged = {c: np.concatenate([p[c] for p in pending]) for c in chunk}
                pending, n_pending = [], 0
                self._batches_yielded += 1
                yield self.assemble(merged)
            while n - lo >= b:
                self._batches_yielded += 1
                yield self.assemble({c: v[lo : lo + b] for c, v in chunk.items()})
                lo += b
            if lo < n:
                pending.append({c: v[lo:] for c, v in chunk.items()})
                n_pending += n - lo
        if n_pending:  # the last, incomplete batch (num_samples already excludes it under drop_last)
            merged = {c: np.concatenate([p[c] for p in pending]) for c in pending[0]}
            self._batches_yielded += 1
            yield self.assemble(merged)

    # ------------------------------------------------------------------------------------------------------
    # Batch assembly
    # ------------------------------------------------------------------------------------------------------

    def history_rows(self, cols: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each sample's history as timeline rows, oldest first, right-aligned.

        Returns:
            rows int64 [B, L] (the pad row where empty), mask bool [B, L], count int64 [B].
        """
        user, hist_len, L = cols["user_index"], cols["hist_len"], self.history_length
        if self.history_mode == "recent":
            rows, valid = self.dataset.timelines.recent(user, hist_len, L)
            return np.where(valid, rows, self._pad_row), valid, np.minimum(hist_len, L)
        rows = self._retrieved.lookup(cols["sample_id"], L)  # [B, L], NO_ROW = empty
        valid = rows != NO_ROW
        start = self._offsets[user][:, None]
        outside = valid & ((rows < start) | (rows >= start + hist_len[:, None]))
        if outside.any():
            bad = np.flatnonzero(outside.any(axis=1))
            raise ValueError(
                "retrieved rows outside the sample's history (at or after the sample, or another user's) "
                f"for sample ids {cols['sample_id'][bad[:5]].tolist()}"
            )
        rows = np.sort(rows, axis=1)  # NO_ROW (-1) sorts first: chronological, right-aligned
        valid = rows != NO_ROW
        return np.where(valid, rows, self._pad_row), valid, valid.sum(axis=1, dtype=np.int64)

    def behaviour_tensors(
        self, rows: np.ndarray, mask: np.ndarray, own_row: np.ndarray, prefix: str = "hist_"
    ) -> dict[str, torch.Tensor]:
        """The item fields, rating bucket, mask and age of timeline ``rows`` [B, n] (pad row where
        ``mask`` [B, n] is False) as batch tensors named ``<prefix><item|field|rating|mask|age>``.
        ``own_row`` [B]: each sample's own timeline row, so a behaviour at row r is ``own_row - r`` ago."""
        item_index = np.take(self._tl_item, rows)  # [B, n], n_items (-> PAD_ID) where empty
        out = {}
        for name, table in self._item_tables.items():  # name: hist_item, hist_<field>
            out[prefix + name[len("hist_") :]] = torch.from_numpy(np.take(table, item_index))
        out[prefix + "rating"] = torch.from_numpy(np.take(self._tl_rating, rows).astype(np.int64))
        out[prefix + "mask"] = torch.from_numpy(mask)
        out[prefix + "age"] = torch.from_numpy(np.where(mask, own_row[:, None] - rows, 0))  # >= 1 where real
        return out

    def assemble(self, cols: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """One batch from sample columns (numpy [B] each; int64 ids, float32 label)."""
        rows, mask, count = self.history_rows(cols)  # [B, L], [B, L], [B]
        # [B] columns are copied so that a kept batch does not pin the whole shuffle buffer in memory
        batch = {"sample_id": torch.from_numpy(cols["sample_id"].copy())}
        batch["label"] = torch.from_numpy(cols["label"].copy())
        for field in self.fields:
            batch[field] = torch.from_numpy(cols[field].copy())
        # the sample's own row is offset(u) + hist_len: behaviour row r lies own_row - r behaviours back
        own_row = self._offsets[cols["user_index"]].astype(np.int64) + cols["hist_len"]  # [B]
        batch |= self.behaviour_tensors(rows, mask, own_row)  # hist_*: [B, L]
        batch["hist_len"] = torch.from_numpy(np.ascontiguousarray(count, dtype=np.int64))
        if self.recent_length:
            recent, valid = self.dataset.timelines.recent(
                cols["user_index"], cols["hist_len"], self.recent_length
            )
            recent = np.where(valid, recent, self._pad_row)
            batch |= self.behaviour_tensors(recent, valid, own_row, RECENT_PREFIX)  # recent_*: [B, R]
        return batch


def split_sample_ids(dataset: ProcessedDataset, split: str) -> np.ndarray:
    """Every sample id of ``split``, ascending (int64)."""
    parts = [
        pq.read_table(f, columns=["sample_id"]).column("sample_id").to_numpy()
        for f in dataset.split_files(split)
    ]
    return np.sort(np.concatenate(parts).astype(np.int64))


def uniform_sample_ids(dataset: ProcessedDataset, split: str, n: int, seed: int) -> np.ndarray:
    """A seeded uniform sample (without replacement) of ``n`` sample ids of ``split``, ascending.

    It depends on the split's ids, ``n`` and ``seed`` only (not on ranks, shards or batch sizes), so runs on
    any number of ranks, and different models, evaluate the same samples. ``n`` at least the split's size
    gives the whole split.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids = split_sample_ids(dataset, split)
    if n >= len(ids):
        return ids
    return np.sort(ids[np.random.default_rng(seed).choice(len(ids), size=n, replace=False)])

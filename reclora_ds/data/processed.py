"""The processed-dataset directory: how it is written and how trainers read it.

Layout (``SCHEMA_VERSION`` 1)::

    metadata.json            schema, fields and vocab sizes, counts and label rates, drops, raw checksums, config
    config.yaml              the resolved PrepareConfig
    run_info.json            wall times and peak memory of the run (the only file that differs between reruns)
    summary.png              split sizes and label rates, history lengths, samples over time (a view)
    samples/{split}-{k:05d}-of-{n:05d}.parquet   split in train, valid, test, fewshot
    timelines.parquet        every kept interaction, user-major then time-ordered (the lifelong histories)
    users.parquet            one row per user: dense index, raw id, timeline offset/length, encoded features
    items.parquet            one row per item: dense index, raw id, title, description, encoded features
    vocabs.json              the known values of every categorical field, in id order (id = position + 2)

A sample row holds ``sample_id`` (its position in the global order = its row in ``timelines`` order before
the user-major sort), ``user_index``, ``item_index``, ``label``, ``rating``, ``timestamp``, ``hist_len`` and one
int32 column per encoded feature. Its history is ``timeline(user_index)[:hist_len]``: histories are
stored once per user, not copied per sample (``metadata.json: history_storage`` gives both sizes).
The ID view (CRM) and the text view (prompts) of a sample are joined by ``sample_id``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from reclora_ds.config import UserError
from reclora_ds.data.preprocess import SPLITS, Prepared
from reclora_ds.data.specs import DatasetSpec
from reclora_ds.files import sha256_file, write_text_atomic

SCHEMA_VERSION = 1
ALL_SPLITS = (*SPLITS, "fewshot")
PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": True}


def feature_columns(metadata: dict[str, Any]) -> list[str]:
    """Encoded categorical feature columns of a sample row, in metadata order."""
    return list(metadata["fields"])


def shard_names(split: str, n_rows: int, shards: int) -> list[str]:
    n = max(1, min(shards, n_rows))
    return [f"{split}-{k:05d}-of-{n:05d}.parquet" for k in range(n)]


def metadata_sha256(data_dir: str | Path) -> str:
    """sha256 of a processed dataset's ``metadata.json`` (vocab sizes, splits, raw checksums): its identity."""
    return sha256_file(Path(data_dir) / "metadata.json")


def sample_table(p: Prepared, ids: np.ndarray, spec: DatasetSpec) -> pa.Table:
    """Rows of the given global positions as a sample table (ID view)."""
    user = p.user_index_g[ids]
    item = p.item_index_g[ids]
    columns: dict[str, Any] = {
        "sample_id": pa.array(ids, pa.int64()),
        "user_index": pa.array(user, pa.int32()),
        "item_index": pa.array(item, pa.int32()),
        "label": pa.array(p.label_g[ids], pa.int8()),
        "rating": pa.array(p.rating_g[ids], pa.float32()),
        "timestamp": pa.array(p.timestamp_g[ids], pa.int64()),
        "hist_len": pa.array(p.hist_len_g[ids], pa.int32()),
    }
    tables = {"users": (p.users, user), "items": (p.items, item)}
    for field, (table_name, column) in spec.feature_columns().items():
        table, index = tables[table_name]
        columns[field] = pa.array(table.column(column).to_numpy()[index], pa.int32())
    return pa.table(columns)


def write_processed(
    p: Prepared, spec: DatasetSpec, out: Path, shards_per_split: int, metadata: dict[str, Any]
) -> dict[str, list[str]]:
    """Write shards, timelines, users, items, vocabs and metadata.json into ``out``; return shard names."""
    (out / "samples").mkdir(parents=True, exist_ok=True)
    for stale in (out / "samples").glob("*.parquet"):
        stale.unlink()
    shards: dict[str, list[str]] = {}
    plan = []
    for split in ALL_SPLITS:
        ids = p.fewshot_ids if split == "fewshot" else p.split_ids(split)
        shards[split] = shard_names(split, len(ids), shards_per_split)
        plan += list(zip(shards[split], np.array_split(ids, len(shards[split]))))
    for name, block in tqdm(plan, desc="write shards", unit=" shard", leave=False):
        pq.write_table(sample_table(p, block, spec), out / "samples" / name, **PARQUET_OPTIONS)
    order = p.timeline_order
    timelines = pa.table(
        {
            "sample_id": pa.array(order.astype(np.int64)),
            "user_index": pa.array(p.user_index_g[order]),
            "item_index": pa.array(p.item_index_g[order]),
            "rating": pa.array(p.rating_g[order]),
            "timestamp": pa.array(p.timestamp_g[order]),
            "label": pa.array(p.label_g[order]),
        }
    )
    pq.write_table(timelines, out / "timelines.parquet", **PARQUET_OPTIONS)
    pq.write_table(p.users, out / "users.parquet", **PARQUET_OPTIONS)
    pq.write_table(p.items, out / "items.parquet", **PARQUET_OPTIONS)
    vocabs = {
        name: [v.item() if hasattr(v, "item") else v for v in vocab.values]
        for name, vocab in p.vocabs.items()
    }
    write_text_atomic(out / "vocabs.json", json.dumps(vocabs, ensure_ascii=False))
    metadata = {**metadata, "shards": shards}
    write_text_atomic(out / "metadata.json", json.dumps(metadata, indent=2, ensure_ascii=False))
    return shards


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Timelines:
    """Every user's lifelong history, user-major (CSR): rows ``offsets[u]:offsets[u+1]`` are user ``u``'s."""

    item_index: np.ndarray  # int32 [N]
    rating: np.ndarray  # float32 [N]
    timestamp: np.ndarray  # int64 [N]
    label: np.ndarray  # int8 [N]
    sample_id: np.ndarray  # int64 [N], global positions
    offsets: np.ndarray  # int64 [U + 1]

    def history(self, user_index: int, hist_len: int) -> slice:
        """Slice of the user's rows strictly before the sample (its lifelong history)."""
        start = int(self.offsets[user_index])
        return slice(start, start + int(hist_len))

    def recent(self, user_index: np.ndarray, hist_len: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised last-``k`` history rows per sample: (row indices [B, k], valid mask [B, k]).

        Row ``j`` of a sample is its ``hist_len - k + j``-th history item (oldest first, right-aligned);
        positions before the start of the history are masked.
        """
        start = self.offsets[user_index].astype(np.int64)
        pos = hist_len.astype(np.int64)[:, None] - k + np.arange(k)[None, :]  # [B, k]
        valid = pos >= 0
        return start[:, None] + np.where(valid, pos, 0), valid


class ProcessedDataError(UserError):
    """A processed-dataset folder does not match its ``metadata.json`` (names the folder and the mismatch)."""


class ProcessedDataset:
    """Read access to a processed-dataset directory (metadata, shards, tables, histories, text views).

    Opening checks the folder against its ``metadata.json`` before anything is read: the schema version,
    that every listed shard exists and no other shard is in ``samples/`` (a mix of two runs), and the row
    count of every split (parquet footers only) and of the timelines, users and items tables where the
    metadata records them. A mismatch is a :class:`ProcessedDataError`.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "metadata.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path}: not a processed dataset (no metadata.json); run `reclora-ds prepare`"
            )
        try:
            self.metadata: dict[str, Any] = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise ProcessedDataError(f"{meta_path}: not valid JSON ({exc})") from None
        if not isinstance(self.metadata, dict):
            raise ProcessedDataError(f"{meta_path}: not a JSON object")
        version = self.metadata.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ProcessedDataError(
                f"{meta_path}: schema_version {version}, this reclora_ds reads {SCHEMA_VERSION}; re-run prepare"
            )
        self._check_against_metadata()

    def _check_against_metadata(self) -> None:
        shards = self.metadata.get("shards")
        if not isinstance(shards, dict):
            raise ProcessedDataError(f"{self.path}/metadata.json: no shard list (an unfinished prepare?)")
        listed = {name for names in shards.values() for name in names}
        samples = self.path / "samples"
        missing = sorted(name for name in listed if not (samples / name).is_file())
        if missing:
            raise ProcessedDataError(
                f"{samples}: lacks {len(missing)} shard(s) metadata.json lists ({', '.join(missing[:3])}); "
                "the folder is incomplete or mixed: run prepare again"
            )
        extra = sorted(p.name for p in samples.glob("*.parquet") if p.name not in listed)
        if extra:
            raise ProcessedDataError(
                f"{samples}: holds shard(s) metadata.json does not list ({', '.join(extra[:3])}): a mix of two "
                "runs; run prepare again"
            )
        splits = self.metadata.get("splits", {})
        for split, names in shards.items():
            expected = splits.get(split, {}).get("rows") if isinstance(splits.get(split), dict) else None
            if expected is None:
                continue
            found = sum(pq.ParquetFile(samples / name).metadata.num_rows for name in names)
            if found != expected:
                raise ProcessedDataError(
                    f"{samples}: split {split!r} has {found} rows in its shards, metadata.json says {expected}; "
                    "run prepare again"
                )
        counts = self.metadata.get("counts", {})
        for file, key in (
            ("timelines.parquet", "interactions"),
            ("users.parquet", "users"),
            ("items.parquet", "items"),
        ):
            if key in counts and (self.path / file).is_file():
                found = pq.ParquetFile(self.path / file).metadata.num_rows
                if found != counts[key]:
                    raise ProcessedDataError(
                        f"{self.path / file}: {found} rows, metadata.json counts {counts[key]} {key}; "
                        "run prepare again"
                    )

    def split_files(self, split: str) -> list[str]:
        if split not in self.metadata["shards"]:
            raise KeyError(f"unknown split {split!r}; available: {sorted(self.metadata['shards'])}")
        return [str(self.path / "samples" / name) for name in self.metadata["shards"][split]]

    def stream(self, split: str, rank: int = 0, world_size: int = 1):
        """A ``datasets`` IterableDataset over the split's shards, this rank's part only.

        With a number of shards divisible by ``world_size``, ``split_dataset_by_node`` gives each rank whole
        files (disjoint, together the split); otherwise every rank reads all rows and keeps one in world_size.
        """
        import datasets
        from datasets.distributed import split_dataset_by_node

        ds = datasets.load_dataset(
            "parquet", data_files=self.split_files(split), split="train", streaming=True
        )
        if world_size > 1:
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        return ds

    def read_split(self, split: str, columns: list[str] | None = None) -> pa.Table:
        """The whole split as one Arrow table (memory-mapped parquet reads)."""
        return pa.concat_tables(
            pq.read_table(f, columns=columns, memory_map=True) for f in self.split_files(split)
        )

    def iter_batches(
        self, split: str, batch_size: int, files: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        for f in files or self.split_files(split):
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size)

    @cached_property
    def items(self) -> pa.Table:
        return pq.read_table(self.path / "items.parquet")

    @cached_property
    def users(self) -> pa.Table:
        return pq.read_table(self.path / "users.parquet")

    @cached_property
    def vocabs(self) -> dict[str, list]:
        return json.loads((self.path / "vocabs.json").read_text())

    @cached_property
    def timelines(self) -> Timelines:
        t = pq.read_table(self.path / "timelines.parquet")
        users = self.users
        offsets = np.zeros(users.num_rows + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(users.column("timeline_length").to_numpy())
        return Timelines(
            item_index=t.column("item_index").to_numpy(),
            rating=t.column("rating").to_numpy(),
            timestamp=t.column("timestamp").to_numpy(),
            label=t.column("label").to_numpy(),
            sample_id=t.column("sample_id").to_numpy(),
            offsets=offsets,
        )

    def decode(self, field: str, ids: np.ndarray) -> list:
        """Encoded ids of ``field`` back to raw values (None for PAD and OOV)."""
        values = self.vocabs[field]
        return [values[i - 2] if i >= 2 else None for i in np.asarray(ids).tolist()]

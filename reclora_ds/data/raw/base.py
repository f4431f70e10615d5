"""The raw-reading contract: every reader returns a :class:`RawData` of plain columns.

Interactions are numpy columns (one entry per kept raw row) with the file and line each came from, so later
drops (duplicates, unknown ids, ...) can still point at their source line. Item and user metadata are
Arrow tables keyed by the raw integer id, with one string column per categorical field of the
dataset's :class:`~reclora_ds.data.specs.DatasetSpec` plus ``title`` for items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from reclora_ds.data.errors import DropLog

# Timestamps outside [1970-01-01, 2100-01-01) are treated as out of range.
MAX_TIMESTAMP = 4_102_444_800


@dataclass
class RawInteractions:
    """Kept raw rows, in file order (all numpy, same length).

    user: int64 raw user id (GoodReads: index into ``RawData.user_keys``).
    item: int64 raw item id.  rating: float32.  timestamp: int64 seconds since the epoch (UTC).
    file: int16 index into ``RawData.file_names``.  line: int64 1-based line in that file.
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    file: np.ndarray
    line: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def select(self, mask_or_index: np.ndarray) -> RawInteractions:
        return RawInteractions(**{k: getattr(self, k)[mask_or_index] for k in self.__dataclass_fields__})


@dataclass
class InteractionBuffer:
    """Accumulates interaction batches from a streaming reader and concatenates them once."""

    parts: dict[str, list[np.ndarray]] = field(
        default_factory=lambda: {k: [] for k in ("user", "item", "rating", "timestamp", "file", "line")}
    )
    rows_read: int = 0

    def append(self, *, user, item, rating, timestamp, file_index: int, line) -> None:
        self.parts["user"].append(np.asarray(user, dtype=np.int64))
        self.parts["item"].append(np.asarray(item, dtype=np.int64))
        self.parts["rating"].append(np.asarray(rating, dtype=np.float32))
        self.parts["timestamp"].append(np.asarray(timestamp, dtype=np.int64))
        self.parts["file"].append(np.full(len(line), file_index, dtype=np.int16))
        self.parts["line"].append(np.asarray(line, dtype=np.int64))

    def build(self) -> RawInteractions:
        dtypes = {
            "user": np.int64,
            "item": np.int64,
            "rating": np.float32,
            "timestamp": np.int64,
            "file": np.int16,
            "line": np.int64,
        }
        return RawInteractions(
            **{k: (np.concatenate(v) if v else np.zeros(0, dtype=dtypes[k])) for k, v in self.parts.items()}
        )


@dataclass
class RawData:
    """Everything a reader extracted from one raw dataset folder.

    raw_rows: number of data rows in the interaction files (blank lines excluded); the accounting
        invariant is ``raw_rows == samples + drops.total`` after preprocessing.
    items: Arrow table with ``item`` (int64), ``title`` (string) and the spec's item fields (strings).
    users: Arrow table with ``user`` (int64) and the spec's user fields, or None.
    user_keys: GoodReads hex user ids (``user`` indexes them), else None.
    files: every raw file read (for checksums). file_names: short names used in drop examples.
    """

    dataset: str
    interactions: RawInteractions
    items: pa.Table
    users: pa.Table | None
    raw_rows: int
    files: list[Path]
    file_names: list[str]
    drops: DropLog
    user_keys: list[str] | None = None

"""Raw readers, one per dataset layout; :func:`read_raw` picks by the config's ``dataset``."""

from __future__ import annotations

from pathlib import Path

from reclora_ds.data.errors import DropLog
from reclora_ds.data.raw.base import RawData


def read_raw(
    dataset: str, raw_dir: Path, drops: DropLog, meta_drops: DropLog, *, batch_rows: int, goodreads=None
) -> RawData:
    """Read ``raw_dir`` in the layout of ``dataset`` (``ml-25m``, ``ml-1m`` or ``goodreads``)."""
    if dataset == "ml-25m":
        from reclora_ds.data.raw.movielens import read_ml25m

        return read_ml25m(raw_dir, drops, meta_drops, batch_rows)
    if dataset == "ml-1m":
        from reclora_ds.data.raw.movielens import read_ml1m

        return read_ml1m(raw_dir, drops, meta_drops, batch_rows)
    if dataset == "goodreads":
        from reclora_ds.data.raw.goodreads import read_goodreads

        return read_goodreads(raw_dir, drops, meta_drops, batch_rows, goodreads)
    raise ValueError(f"unknown dataset {dataset!r}")

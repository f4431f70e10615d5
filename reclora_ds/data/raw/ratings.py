"""Shared parsing of (user, item, rating, timestamp) rows: the MovieLens layouts and the GoodReads csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from reclora_ds.data.errors import DropLog, RawDataError
from reclora_ds.data.raw.base import MAX_TIMESTAMP, InteractionBuffer
from reclora_ds.data.raw.delimited import parse_float, parse_int, read_delimited
from reclora_ds.data.specs import DatasetSpec


def read_rating_rows(
    path: Path,
    spec: DatasetSpec,
    drops: DropLog,
    buffer: InteractionBuffer,
    *,
    file_index: int,
    delimiter: str,
    header: list[str] | None,
    batch_rows: int,
    timestamps: bool = True,
) -> None:
    """Stream a ratings file into ``buffer``, dropping (and counting) rows with bad values.

    The file's four columns are user, item, rating, timestamp (in that order, whatever the header calls
    them). With ``timestamps=False`` (GoodReads csv) the third column is the rating and the line number
    stands in for the time, which the caller documents.
    Row checks, first failing reason counted: user id, item id, rating missing, rating not a number,
    rating off the scale, timestamp not an integer, timestamp out of range.

    Raises:
        RawDataError: besides :func:`read_delimited`'s file errors, when not one data row of the file is
            usable (another scale, quoted fields, millisecond timestamps, ...): the message gives the drop
            counts of this file and the first line of each reason.
    """
    fields = ["user", "item", "rating", "timestamp"] if timestamps else ["user", "item", "rating"]
    name = path.name
    rows_before, kept = buffer.rows_read, 0
    file_drops: dict[str, list] = {}  # reason -> [count, first line]
    with tqdm(desc=f"read {name}", unit=" rows", unit_scale=True, leave=False) as bar:
        for batch in read_delimited(path, fields, delimiter, drops, header=header, batch_rows=batch_rows):
            buffer.rows_read += batch.raw_count
            bar.update(batch.raw_count)
            lines = batch.lines
            user, user_ok = parse_int(batch.columns["user"])
            item, item_ok = parse_int(batch.columns["item"])
            rating, rating_ok, rating_missing = parse_float(batch.columns["rating"])
            if timestamps:
                ts, ts_ok = parse_int(batch.columns["timestamp"])
            else:
                ts, ts_ok = lines.copy(), np.ones(len(lines), dtype=bool)
            keep = np.ones(len(lines), dtype=bool)
            checks = [
                ("user_id_invalid", ~user_ok | (user < 0)),
                ("item_id_invalid", ~item_ok | (item < 0)),
                ("rating_missing", rating_missing),
                ("rating_invalid", ~rating_ok),
                ("rating_out_of_range", ~spec.rating_valid(np.where(rating_ok, rating, spec.rating_min))),
                ("timestamp_invalid", ~ts_ok),
                ("timestamp_out_of_range", (ts < 0) | (ts >= MAX_TIMESTAMP)),
            ]
            for reason, bad in checks:
                bad = bad & keep
                if bad.any():
                    drops.add_lines(reason, bad, lines, name)
                    keep &= ~bad
                    entry = file_drops.setdefault(reason, [0, int(lines[bad][0])])
                    entry[0] += int(bad.sum())
            kept += int(keep.sum())
            buffer.append(
                user=user[keep],
                item=item[keep],
                rating=rating[keep],
                timestamp=ts[keep],
                file_index=file_index,
                line=lines[keep],
            )
    rows = buffer.rows_read - rows_before
    if rows and not kept:
        found = "; ".join(
            f"{reason} {count:,} (first at line {line})" for reason, (count, line) in file_drops.items()
        )
        raise RawDataError(
            path,
            f"none of its {rows:,} data rows is usable ({found or 'every line malformed'}): "
            "wrong scale, quoting or units, or not this dataset's layout?",
        )

"""GoodReads json layout: interaction files (json lines, optionally gzipped) and the books they refer to."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from reclora_ds.data.errors import DropLog
from reclora_ds.data.raw.base import MAX_TIMESTAMP, InteractionBuffer, RawData
from reclora_ds.data.raw.goodreads.books import read_books
from reclora_ds.data.raw.goodreads.jsonl import stream_json_lines
from reclora_ds.data.raw.goodreads.parsing import (
    USER_RE,
    FileTally,
    UserCodes,
    apply_checks,
    parse_goodreads_dates,
    parse_ids,
    rating_checks,
    rel_name,
    unique_sorted,
)


def interaction_schema(timestamp_field: str) -> pa.Schema:
    """The keys read from an interaction line (rating typed int64 on the fast path)."""
    return pa.schema(
        [
            ("user_id", pa.string()),
            ("book_id", pa.string()),
            ("rating", pa.int64()),
            (timestamp_field, pa.string()),
        ]
    )


def read_json_layout(
    raw_dir: Path,
    inter_files: list[Path],
    book_files: list[Path],
    drops: DropLog,
    meta_drops: DropLog,
    batch_rows: int,
    timestamp_field: str,
) -> RawData:
    """Interaction files (read in the given order; a row's file index is the position) and book files."""
    names = [rel_name(p, raw_dir) for p in inter_files]
    schema = interaction_schema(timestamp_field)
    codes = UserCodes()
    buffer = InteractionBuffer()
    with tqdm(desc="read goodreads interactions", unit=" rows", unit_scale=True, leave=False) as bar:
        for file_index, path in enumerate(inter_files):
            name = names[file_index]
            tally = FileTally()
            for batch in stream_json_lines(
                path, schema, batch_rows, required=tuple(schema.names), what="interactions"
            ):
                buffer.rows_read += len(batch)
                bar.update(len(batch))
                t = batch.table
                users = pc.utf8_lower(pc.fill_null(t.column("user_id").combine_chunks(), ""))
                user_ok = pc.match_substring_regex(users, USER_RE).to_numpy(zero_copy_only=False)
                item, item_ok = parse_ids(t.column("book_id").combine_chunks())
                rating, rating_bad = rating_checks(t.column("rating").combine_chunks())
                ts, ts_ok = parse_goodreads_dates(t.column(timestamp_field).combine_chunks())
                checks = [
                    ("user_id_invalid", ~user_ok),
                    ("item_id_invalid", ~item_ok),
                    *rating_bad,
                    ("timestamp_invalid", ~ts_ok),
                    ("timestamp_out_of_range", (ts < 0) | (ts >= MAX_TIMESTAMP)),
                ]
                keep = apply_checks(checks, batch.lines, name, drops, tally)
                buffer.append(
                    user=codes.encode(users.filter(pa.array(keep))),
                    item=item[keep],
                    rating=rating[keep],
                    timestamp=ts[keep],
                    file_index=file_index,
                    line=batch.lines[keep],
                )
            tally.check_usable(path)
    interactions = buffer.build()
    items, extra = read_books(raw_dir, book_files, unique_sorted(interactions.item), meta_drops, batch_rows)
    return RawData(
        dataset="goodreads",
        interactions=interactions,
        items=items,
        users=None,
        raw_rows=buffer.rows_read,
        files=[*inter_files, *book_files, *extra],
        file_names=names,
        drops=drops,
        user_keys=codes.keys,
    )

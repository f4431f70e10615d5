"""GoodReads csv layout: ``goodreads_interactions.csv`` (integer ids, no timestamps) and its id maps.

File order stands in for the time (a warning is logged), as ``csv_order`` says
(:class:`~reclora_ds.data.config.GoodreadsOptions`): ``user_progress`` (default) gives the k-th of a user's
n_u rows (0-based, in file order) the time ``floor(k * 10^9 / n_u)`` (:func:`user_progress_times`), so the
global (time, user, item) order interleaves users by their progress and the 8:1:1 split lies within every
user's timeline; ``file`` gives the line number, so the split follows the file (in the UCSD file, blocks of
users: valid and test are then users absent from training). Its ids are not the json ids: when
``book_id_map.csv`` (``book_id_csv,book_id``) is present, csv book ids are mapped to json book ids so the
books files give metadata (csv ids missing from the map are dropped as ``unknown_item``); without the map
the items get empty metadata fields. ``user_id_map.csv`` (``user_id_csv,user_id``), when present, gives the
hex user keys and the same user codes as the json layout (csv users missing from it are dropped as
``unknown_user``); without it the csv user ids are the raw user ids. A csv id repeated in a map keeps its
first mapping (``duplicate_id`` in the metadata drops). ``is_read`` and ``is_reviewed`` are not used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm.auto import tqdm

from reclora_ds.data.config import CSV_ORDERS
from reclora_ds.data.errors import DropLog
from reclora_ds.data.raw.base import InteractionBuffer, RawData
from reclora_ds.data.raw.delimited import read_delimited
from reclora_ds.data.raw.goodreads.books import read_books
from reclora_ds.data.raw.goodreads.parsing import (
    USER_RE,
    FileTally,
    UserCodes,
    apply_checks,
    parse_ids,
    rating_checks,
    rel_name,
    unique_sorted,
)
from reclora_ds.data.specs import GOODREADS

log = logging.getLogger(__name__)

CSV_NAME = "goodreads_interactions.csv"
PROGRESS_SCALE = 10**9  # user_progress times lie in [0, 10^9): valid epoch seconds, like real timestamps
CSV_HEADER = ["user_id", "book_id", "is_read", "rating", "is_reviewed"]
BOOK_ID_MAP = "book_id_map.csv"
BOOK_ID_MAP_HEADER = ["book_id_csv", "book_id"]
USER_ID_MAP = "user_id_map.csv"
USER_ID_MAP_HEADER = ["user_id_csv", "user_id"]


@dataclass
class IdMap:
    """A csv id map (``book_id_map.csv`` / ``user_id_map.csv``): sorted csv ids and their json ids."""

    csv_ids: np.ndarray  # int64, sorted, distinct
    json_ids: np.ndarray | pa.Array  # int64 book ids, or hex user keys (Arrow strings)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in the map, found mask) of csv ids; the position is 0 where not found."""
        if len(self.csv_ids) == 0:
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        pos = np.minimum(np.searchsorted(self.csv_ids, ids), len(self.csv_ids) - 1)
        found = self.csv_ids[pos] == ids
        return np.where(found, pos, 0), found


def read_id_map(path: Path, header: list[str], meta_drops: DropLog, batch_rows: int, *, users: bool) -> IdMap:
    """Read an id map csv; bad lines are metadata drops, a repeated csv id keeps its first mapping."""
    name = path.name
    csv_ids, json_ids, lines = [], [], []
    for batch in read_delimited(path, ["csv", "json"], ",", meta_drops, header=header, batch_rows=batch_rows):
        cid, cok = parse_ids(batch.columns["csv"])
        if users:
            jcol = pc.utf8_lower(batch.columns["json"])
            jok = pc.match_substring_regex(jcol, USER_RE).to_numpy(zero_copy_only=False)
        else:
            jcol, jok = parse_ids(batch.columns["json"])
        reason = "user_id_invalid" if users else "item_id_invalid"
        ok = apply_checks([(reason, ~(cok & jok))], batch.lines, name, meta_drops)
        csv_ids.append(cid[ok])
        json_ids.append(jcol.filter(pa.array(ok)) if users else jcol[ok])
        lines.append(batch.lines[ok])
    cids, line = np.concatenate(csv_ids), np.concatenate(lines)
    order = np.argsort(cids, kind="stable")
    keys, first = np.unique(cids[order], return_index=True)
    keep = order[first]  # the first line of each csv id
    dup = np.ones(len(cids), dtype=bool)
    dup[keep] = False
    meta_drops.add_mask("duplicate_id", dup, np.zeros(len(cids), np.int16), line, [name])
    if users:
        return IdMap(keys, pa.concat_arrays(json_ids).take(pa.array(keep)))
    return IdMap(keys, np.concatenate(json_ids)[keep])


def user_progress_times(user: np.ndarray, line: np.ndarray) -> np.ndarray:
    """``floor(k * PROGRESS_SCALE / n_u)`` (int64) for the row that is the k-th (0-based, by ``line``) of its
    user's ``n_u`` rows: the user's progress through their own timeline, in [0, PROGRESS_SCALE)."""
    order = np.lexsort((line, user))  # user-major, file order within a user
    sorted_user = user[order]
    starts = (
        np.flatnonzero(np.r_[True, sorted_user[1:] != sorted_user[:-1]]) if len(user) else np.zeros(0, int)
    )
    counts = np.diff(np.r_[starts, len(user)])
    rank = np.arange(len(user), dtype=np.int64) - np.repeat(starts, counts)
    times = np.empty(len(user), dtype=np.int64)
    times[order] = rank * PROGRESS_SCALE // np.repeat(counts, counts)
    return times


def read_csv_layout(
    raw_dir: Path,
    csv_path: Path,
    book_files: list[Path],
    drops: DropLog,
    meta_drops: DropLog,
    batch_rows: int,
    order: str = "user_progress",
) -> RawData:
    """The csv interactions, mapped to json ids where the maps are present; books only with the book map.

    ``order`` (``GoodreadsOptions.csv_order``): what stands in for the missing timestamps (module docstring).
    """
    if order not in CSV_ORDERS:
        raise ValueError(f"csv_order must be one of {list(CSV_ORDERS)}, got {order!r}")
    log.warning(
        "%s has no timestamps: FILE ORDER stands in for time (csv_order=%s: %s), not real dates",
        csv_path,
        order,
        "each user's progress through their rows, so the split lies within every user's timeline"
        if order == "user_progress"
        else "the line number, so the split follows the file's blocks of users",
    )
    files = [csv_path]
    book_map = user_map = None
    if book_files and (raw_dir / BOOK_ID_MAP).is_file():
        book_map = read_id_map(raw_dir / BOOK_ID_MAP, BOOK_ID_MAP_HEADER, meta_drops, batch_rows, users=False)
        files.append(raw_dir / BOOK_ID_MAP)
    elif book_files:
        log.warning(
            "%s: csv book ids are not the json book ids and %s is missing: books get empty metadata",
            raw_dir,
            BOOK_ID_MAP,
        )
    if (raw_dir / USER_ID_MAP).is_file():
        user_map = read_id_map(raw_dir / USER_ID_MAP, USER_ID_MAP_HEADER, meta_drops, batch_rows, users=True)
        files.append(raw_dir / USER_ID_MAP)

    name = rel_name(csv_path, raw_dir)
    codes = UserCodes()
    buffer = InteractionBuffer()
    tally = FileTally()
    fields = ["user", "item", "is_read", "rating", "is_reviewed"]
    with tqdm(desc=f"read {name}", unit=" rows", unit_scale=True, leave=False) as bar:
        for batch in read_delimited(
            csv_path, fields, ",", drops, header=CSV_HEADER, batch_rows=batch_rows, display_name=name
        ):
            buffer.rows_read += batch.raw_count
            bar.update(batch.raw_count)
            user, user_ok = parse_ids(batch.columns["user"])
            item, item_ok = parse_ids(batch.columns["item"])
            rating, rating_bad = rating_checks(batch.columns["rating"])
            checks = [("user_id_invalid", ~user_ok), ("item_id_invalid", ~item_ok), *rating_bad]
            if book_map is not None:
                book_pos, book_found = book_map.lookup(item)
                checks.append(("unknown_item", ~book_found))
                item = book_map.json_ids[book_pos]
            if user_map is not None:
                user_pos, user_found = user_map.lookup(user)
                checks.append(("unknown_user", ~user_found))
            keep = apply_checks(checks, batch.lines, name, drops, tally)
            malformed = batch.raw_count - len(batch.lines)  # dropped and counted by read_delimited
            if malformed:
                tally.rows += malformed
                tally.dropped("malformed_line", malformed, None)
            if user_map is not None:  # same user codes as the json layout: order of first appearance
                user = codes.encode(user_map.json_ids.take(pa.array(user_pos[keep])))
            else:
                user = user[keep]
            buffer.append(
                user=user,
                item=item[keep],
                rating=rating[keep],
                timestamp=batch.lines[keep],
                file_index=0,
                line=batch.lines[keep],
            )
    tally.check_usable(csv_path)
    interactions = buffer.build()
    if order == "user_progress":
        interactions.timestamp = user_progress_times(interactions.user, interactions.line)

    if book_map is not None:
        items, extra = read_books(
            raw_dir, book_files, unique_sorted(interactions.item), meta_drops, batch_rows
        )
        files += [*book_files, *extra]
    else:
        ids = unique_sorted(interactions.item)
        items = pa.table(
            {"item": pa.array(ids, pa.int64())}
            | {c: pa.array([""] * len(ids), pa.string()) for c in ("title", "genres", *GOODREADS.item_fields)}
        )
    user_keys = codes.keys if user_map is not None else None

    return RawData(
        dataset="goodreads",
        interactions=interactions,
        items=items,
        users=None,
        raw_rows=buffer.rows_read,
        files=files,
        file_names=[name],
        drops=drops,
        user_keys=user_keys,
    )

"""GoodReads values: vectorised parsing and checks of one batch, drop accounting, user codes.

Decisions (documented here and in the drop reasons of ``metadata.json``):

* Time: ``timestamp_field`` (``date_added`` by default, or ``date_updated``), a string such as
  ``"Mon Aug 01 13:41:57 -0700 2016"``, parsed with its UTC offset to epoch seconds, vectorised
  (fixed-position fields and integer arithmetic; the tests check it against Python's
  ``datetime.strptime`` with :data:`DATE_FORMAT`). The exact GoodReads shape is required (capitalised
  3-letter day and month names, 2-digit day, a ``+hhmm``/``-hhmm`` offset): a date without an offset or
  with an impossible calendar day or time (Feb 30, hour 24) is ``timestamp_invalid``; the weekday name is
  not checked against the date (as in Python). Dates before 1970 or from 2100 are
  ``timestamp_out_of_range``.
* Rating 0 means "shelved without a rating": not a negative, so the row is dropped as ``unrated_shelf``.
  Ratings must be integral numbers in 0..5 (a numeric string such as ``"4"`` or ``4.0`` is accepted);
  empty, null or NaN is ``rating_missing``, a non-number (``true``, ``"abc"``) ``rating_invalid``, anything
  else (6, -1, 4.5) ``rating_out_of_range``.
* Ids: ``user_id`` must be 32 hex digits (lower-cased; anything else is ``user_id_invalid``, see
  :data:`USER_RE`) and becomes an int code in order of first appearance among kept rows
  (:class:`UserCodes`; ``RawData.user_keys`` holds the hex keys); ``book_id`` must be a string (or JSON
  integer) of at most 18 digits, else ``item_id_invalid``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reclora_ds.data.errors import DropLog, RawDataError
from reclora_ds.data.raw.delimited import parse_float

DATE_FORMAT = "%a %b %d %H:%M:%S %z %Y"
# "Mon Aug 01 13:41:57 -0700 2016": fixed widths, so every piece sits at a fixed position.
_DATE_RE = r"^[A-Z][a-z]{2} [A-Z][a-z]{2} \d{2} \d{2}:\d{2}:\d{2} [+-]\d{4} \d{4}$"
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
USER_RE = r"^[0-9a-fA-F]{32}$"
_ID_RE = r"^\s*\d{1,18}\s*$"  # at most 18 digits always fits int64
RATING_MAX = 5


def parse_goodreads_dates(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """GoodReads date strings ("Mon Aug 01 13:41:57 -0700 2016") -> (epoch seconds int64, valid mask).

    The offset is applied (the result is UTC), as Python's ``datetime.strptime(s, DATE_FORMAT)`` does.
    The fields sit at fixed positions (the shape is checked first), so they are sliced and combined with
    integer arithmetic: Arrow's ``strptime`` gives the same seconds but rolls impossible dates over (Feb 30
    becomes Mar 1) and took 1.3 s per million dates here against about 0.3 s for this. Invalid: another
    shape, no offset, an unknown day or month name, an impossible calendar day or time. As in Python, the
    weekday name is not checked against the date.
    """
    s = pc.utf8_trim_whitespace(pc.fill_null(col.cast(pa.string()), ""))
    ok = pc.match_substring_regex(s, _DATE_RE).to_numpy(zero_copy_only=False)
    s = pc.if_else(pa.array(ok), s, "Thu Jan 01 00:00:00 +0000 1970")  # every slice below is well formed

    def number(lo: int, hi: int) -> np.ndarray:
        return pc.cast(pc.utf8_slice_codeunits(s, lo, hi), pa.int64()).to_numpy(zero_copy_only=False)

    ok &= pc.is_in(pc.utf8_slice_codeunits(s, 0, 3), value_set=pa.array(_DAY_NAMES)).to_numpy(
        zero_copy_only=False
    )
    month = pc.index_in(pc.utf8_slice_codeunits(s, 4, 7), value_set=pa.array(_MONTH_NAMES))
    ok &= month.is_valid().to_numpy(zero_copy_only=False)
    month = pc.fill_null(month, 0).to_numpy(zero_copy_only=False).astype(np.int64)  # 0 = January
    day, hour, minute, second = number(8, 10), number(11, 13), number(14, 16), number(17, 19)
    year = number(26, 30)
    sign = np.where(pc.equal(pc.utf8_slice_codeunits(s, 20, 21), "-").to_numpy(zero_copy_only=False), -1, 1)
    off_h, off_m = number(21, 23), number(23, 25)
    months = (year - 1970) * 12 + month  # months since Jan 1970
    first = months.astype("datetime64[M]").astype("datetime64[D]").astype(np.int64)  # days since epoch
    month_days = (months + 1).astype("datetime64[M]").astype("datetime64[D]").astype(np.int64) - first
    ok &= (day >= 1) & (day <= month_days) & (hour <= 23) & (minute <= 59) & (second <= 59)
    ok &= (off_h <= 23) & (off_m <= 59)  # Python accepts offsets strictly inside +-24 h
    local = (first + day - 1) * 86400 + hour * 3600 + minute * 60 + second
    return np.where(ok, local - sign * (off_h * 3600 + off_m * 60), 0), ok


def parse_ids(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Digit strings (at most 18 digits, surrounding spaces allowed) -> (int64 values, valid mask)."""
    col = pc.fill_null(col.cast(pa.string()), "")
    valid = pc.match_substring_regex(col, _ID_RE)
    values = pc.cast(pc.utf8_trim_whitespace(pc.if_else(valid, col, "0")), pa.int64())
    return values.to_numpy(zero_copy_only=False), valid.to_numpy(zero_copy_only=False)


def rating_checks(col: pa.Array) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """Rating strings -> (float values, [(drop reason, bad mask), ...] in the order they are checked)."""
    values, valid, missing = parse_float(pc.utf8_trim_whitespace(pc.fill_null(col.cast(pa.string()), "")))
    on_scale = (values >= 0) & (values <= RATING_MAX) & (values == np.round(values))
    return values, [
        ("rating_missing", missing),
        ("rating_invalid", ~valid),
        ("rating_out_of_range", ~on_scale),
        ("unrated_shelf", values == 0),
    ]


def apply_checks(
    checks: list[tuple[str, np.ndarray]],
    lines: np.ndarray,
    name: str,
    drops: DropLog,
    tally: FileTally | None = None,
) -> np.ndarray:
    """Count each row under its first failing reason; return the mask of rows that pass every check."""
    keep = np.ones(len(lines), dtype=bool)
    for reason, bad in checks:
        bad = bad & keep
        if bad.any():
            drops.add_lines(reason, bad, lines, name)
            keep &= ~bad
            if tally is not None:
                tally.dropped(reason, int(bad.sum()), int(lines[bad][0]))
    if tally is not None:
        tally.rows += len(lines)
        tally.kept += int(keep.sum())
    return keep


@dataclass
class FileTally:
    """Rows of one interaction file: read, kept, and per reason (count, first line) of the dropped."""

    rows: int = 0
    kept: int = 0
    reasons: dict[str, list] = field(default_factory=dict)  # reason -> [count, first line or None]

    def dropped(self, reason: str, count: int, first_line: int | None) -> None:
        entry = self.reasons.setdefault(reason, [0, first_line])
        entry[0] += count

    def check_usable(self, path: Path) -> None:
        """A file with rows but none usable is the wrong layout, not data to drop silently."""
        if self.rows and not self.kept:
            found = "; ".join(
                f"{r} {n:,}" + (f" (first at line {line})" if line is not None else "")
                for r, (n, line) in self.reasons.items()
            )
            raise RawDataError(
                path,
                f"none of its {self.rows:,} data rows is usable ({found or 'every line malformed'}): "
                "wrong date format, rating scale or ids, or not a GoodReads interactions file?",
            )


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (Arrow's hash unique + a sort of the few distinct values: ~7x np.unique)."""
    return np.sort(pc.unique(pa.array(values)).to_numpy(zero_copy_only=False))


class UserCodes:
    """Hex user keys -> dense int codes in order of first appearance."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def encode(self, keys: pa.Array) -> np.ndarray:
        uniques = pc.unique(keys)  # in order of first appearance
        lookup = np.array([self.index.setdefault(k, len(self.index)) for k in uniques.to_pylist()], np.int64)
        return lookup[pc.index_in(keys, value_set=uniques).to_numpy(zero_copy_only=False)]

    @property
    def keys(self) -> list[str]:
        return list(self.index)


def rel_name(path: Path, raw_dir: Path) -> str:
    """How a file is named in drop logs and messages: its path relative to the raw folder."""
    return path.relative_to(raw_dir).as_posix()

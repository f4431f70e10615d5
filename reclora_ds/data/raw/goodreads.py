"""GoodReads (UCSD Book Graph) reader: json.gz interactions with book metadata, or the integer-id csv.

Layouts of the UCSD files (globs come from :class:`~reclora_ds.config.GoodreadsOptions`):

* **json** (preferred): interaction files matching ``interactions_glob``
  (``goodreads_interactions_dedup.json.gz`` or per-genre ``goodreads_interactions_{genre}.json.gz``;
  several files are read in sorted order, and a row's file index is the position in that order) and book
  files matching ``books_glob`` (required). Optional next to them: ``goodreads_book_authors.json.gz``
  (author names) and ``goodreads_book_genres_initial.json.gz`` (the ``genres`` column).
* **csv** (fallback, used only when no json interaction file matches): ``goodreads_interactions.csv``
  (``user_id,book_id,is_read,rating,is_reviewed`` with integer ids). It has **no timestamps**: the line
  number stands in for the time, so the "temporal" order and split follow the file order (in the UCSD file,
  blocks of users), not real time; a warning is logged. Its ids are not the json ids: when
  ``book_id_map.csv`` (``book_id_csv,book_id``) is present, csv book ids are mapped to json book ids so the
  books files give metadata (csv ids missing from the map are dropped as ``unknown_item``); without the map
  the items get empty metadata fields. ``user_id_map.csv`` (``user_id_csv,user_id``), when present, gives
  the hex user keys and the same user codes as the json layout (csv users missing from it are dropped as
  ``unknown_user``); without it the csv user ids are the raw user ids. A csv id repeated in a map keeps its
  first mapping (``duplicate_id`` in the metadata drops). ``is_read`` and ``is_reviewed`` are not used.

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
* Ids: ``user_id`` must be 32 hex digits (lower-cased; anything else is ``user_id_invalid``) and becomes an
  int code in order of first appearance among kept rows (``RawData.user_keys`` holds the hex keys);
  ``book_id`` must be a string (or JSON integer) of at most 18 digits, else ``item_id_invalid``.
* Missing keys: a key absent from one object counts like an empty value (the row is dropped under that
  field's reason: ``user_id_invalid``, ``item_id_invalid``, ``rating_missing``, ``timestamp_invalid``). A
  required key absent from the first line and empty in the whole first batch of a file is a
  :class:`RawDataError` (a renamed key, the wrong ``timestamp_field`` or the wrong kind of file).
* Structural problems are :class:`RawDataError` naming the file (and line): no matching files (the folder's
  contents are listed), an empty file, a truncated or corrupt gzip, a line that is not a JSON object,
  bytes that are not UTF-8, an interaction file none of whose rows is usable (the message gives the count
  and first line of each reason, as the MovieLens readers do). Blank lines are skipped and not counted;
  line numbers stay exact.
* Books: only books some interaction refers to are kept (the others are skipped, so their repeats are not
  counted); a repeated ``book_id`` keeps the first (``duplicate_id`` in the metadata drops); a book id
  that is not digits is ``item_id_invalid`` there. Other book keys, when absent, count as empty strings.

Item fields (strings; ``""`` when unknown): ``author`` (name of the first listed author from the authors
file, else its ``author_id``), ``publisher``, ``language`` (``language_code``), ``format``, ``year``
(``publication_year``), ``pages`` (``num_pages`` bucketed: ``<100``, ``100-199``, ..., ``1000+``),
``avg_rating`` (``average_rating`` in half-star buckets such as ``3.5-4.0``), ``shelf`` (the most counted
``popular_shelves`` name that is not a status/ownership shelf such as ``to-read``; see
:data:`NON_GENRE_SHELVES`), plus ``title`` and ``genres`` (``|``-separated, most counted first).

Reading: files are streamed line by line with the ``datasets`` ``text`` builder (streaming, Arrow format,
``batch_rows`` lines at a time, line breaks kept) and each batch is parsed by Arrow's JSON reader with an
explicit schema that keeps only the needed keys. The ``datasets`` ``json`` builder is not used: it cannot
name the line of a bad row (it skips blank lines, so "row count + 1" is not the line number), it turns a
key whose type changes between lines into JSON text on its own, and on an unparsable line it falls back to
reading the whole file with pandas (unbounded memory) and then fails without a line. Batches whose types
differ from the schema (a rating written as a string, NaN, ...) are re-parsed line by line in Python, so
every row keeps its exact line. Memory is bounded by one batch (a few copies of its text) plus the compact
output columns. Measured on a synthetic 1M-line interactions json.gz (98 MB) on a shared 2-core machine,
warm: this reader with every check about 0.15-0.2 M lines per CPU-second (0.085-0.22 M lines/s wall,
depending on the load; peak RSS 0.75 GB at ``batch_rows`` 100k, 1.5 GB at 1M); the ``json`` builder
alone, parsing only, about 0.35 M lines per CPU-second.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as paj
from tqdm.auto import tqdm

from reclora_ds.config import GoodreadsOptions
from reclora_ds.data.errors import DropLog, RawDataError
from reclora_ds.data.raw.base import MAX_TIMESTAMP, InteractionBuffer, RawData
from reclora_ds.data.raw.delimited import parse_float, read_delimited
from reclora_ds.data.specs import GOODREADS

log = logging.getLogger(__name__)

CSV_NAME = "goodreads_interactions.csv"
CSV_HEADER = ["user_id", "book_id", "is_read", "rating", "is_reviewed"]
BOOK_ID_MAP = "book_id_map.csv"
BOOK_ID_MAP_HEADER = ["book_id_csv", "book_id"]
USER_ID_MAP = "user_id_map.csv"
USER_ID_MAP_HEADER = ["user_id_csv", "user_id"]
AUTHORS_FILE = "goodreads_book_authors.json.gz"
GENRES_FILE = "goodreads_book_genres_initial.json.gz"

DATE_FORMAT = "%a %b %d %H:%M:%S %z %Y"
# "Mon Aug 01 13:41:57 -0700 2016": fixed widths, so every piece sits at a fixed position.
_DATE_RE = r"^[A-Z][a-z]{2} [A-Z][a-z]{2} \d{2} \d{2}:\d{2}:\d{2} [+-]\d{4} \d{4}$"
_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_USER_RE = r"^[0-9a-fA-F]{32}$"
_ID_RE = r"^\s*\d{1,18}\s*$"  # at most 18 digits always fits int64
RATING_MAX = 5

# Shelves that say what the reader did or owns, not what the book is about; never chosen as ``shelf``.
NON_GENRE_SHELVES = frozenset(
    {
        "to-read", "currently-reading", "read", "owned", "owned-books", "books-i-own", "i-own", "own-it",
        "my-books", "my-library", "library", "favorites", "favourites", "favorite-books", "favorite",
        "all-time-favorites", "default", "wish-list", "wishlist", "to-buy", "tbr", "did-not-finish", "dnf",
        "abandoned", "re-read", "kindle", "ebook", "ebooks", "e-book", "e-books", "audiobook", "audiobooks",
        "audio", "audible", "books", "book-club", "maybe", "on-hold", "to-read-non-fiction",
    }
)  # fmt: skip
PAGE_EDGES = (100, 200, 300, 400, 500, 700, 1000)
PAGE_LABELS = ("<100", "100-199", "200-299", "300-399", "400-499", "500-699", "700-999", "1000+")

BOOK_BATCH_ROWS = 20_000  # book lines are ~4 KB each: cap the batch so memory stays bounded
_BLOCK_BYTES = 1 << 24  # Arrow JSON block; retried with the whole batch when a line straddles blocks

_SHELF_TYPE = pa.list_(pa.struct([("count", pa.string()), ("name", pa.string())]))
_BOOK_COLS = ("title", "author_id", "publisher", "language", "format", "year", "pages", "avg_rating", "shelf")
_AUTHORS_TYPE = pa.list_(pa.struct([("author_id", pa.string()), ("role", pa.string())]))
BOOK_SCHEMA = pa.schema(
    [
        ("book_id", pa.string()),
        ("title", pa.string()),
        ("authors", _AUTHORS_TYPE),
        ("publisher", pa.string()),
        ("language_code", pa.string()),
        ("format", pa.string()),
        ("publication_year", pa.string()),
        ("num_pages", pa.string()),
        ("average_rating", pa.string()),
        ("popular_shelves", _SHELF_TYPE),
    ]
)
AUTHOR_SCHEMA = pa.schema([("author_id", pa.string()), ("name", pa.string())])


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


# ----------------------------------------------------------------------------------------------------------
# Entry point


def read_goodreads(
    raw_dir: Path,
    drops: DropLog,
    meta_drops: DropLog,
    batch_rows: int,
    options: GoodreadsOptions | None = None,
) -> RawData:
    """Read a GoodReads folder: the json.gz layout when interaction files match, else the csv fallback.

    Args:
        raw_dir: folder with the unchanged UCSD files.
        drops: counts rows of the interaction files dropped here (and later by the recipe).
        meta_drops: counts dropped lines of the metadata files (books, id maps).
        batch_rows: lines per streamed batch (memory bound of the reading step).
        options: globs and the timestamp field; defaults when None.
    Raises:
        RawDataError: a missing folder or file, or a structural problem in one (names file and line).
    """
    options = options or GoodreadsOptions()
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise RawDataError(raw_dir, "GoodReads raw data folder not found")
    json_files = _glob_files(raw_dir, options.interactions_glob)
    if json_files:
        return _read_json_layout(raw_dir, json_files, drops, meta_drops, batch_rows, options)
    csv_path = raw_dir / CSV_NAME
    if csv_path.is_file():
        return _read_csv_layout(raw_dir, csv_path, drops, meta_drops, batch_rows, options)
    raise RawDataError(
        raw_dir,
        f"no GoodReads interaction files: expected {options.interactions_glob!r} (json lines) or {CSV_NAME}; "
        f"the folder holds {_listing(raw_dir)}",
    )


def _glob_files(raw_dir: Path, pattern: str) -> list[Path]:
    return sorted(p for p in raw_dir.glob(pattern) if p.is_file())


def _listing(raw_dir: Path, limit: int = 20) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in raw_dir.iterdir())
    if not names:
        return "nothing (empty folder)"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _rel(path: Path, raw_dir: Path) -> str:
    return path.relative_to(raw_dir).as_posix()


# ----------------------------------------------------------------------------------------------------------
# Line-exact JSON lines streaming


@dataclass
class JsonBatch:
    """Parsed non-blank lines of one batch: one table row per line, and the 1-based line numbers."""

    table: pa.Table
    lines: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.lines)


def _stream_lines(path: Path, batch_rows: int) -> Iterator[pa.Array]:
    """The file's lines, each with its line break (.gz decompressed on the fly), as string arrays.

    Keeping the line breaks makes an array's data buffer the newline-separated text that Arrow's JSON
    reader takes, without a copy; past 2 GiB of text in one batch the array gets 64-bit offsets.
    """
    ds = datasets.load_dataset(
        "text", data_files=str(path), split="train", streaming=True, keep_linebreaks=True
    ).with_format("arrow")
    for table in ds.iter(batch_size=batch_rows):
        column = table.column(0)
        try:
            lines = column.combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowCapacityError):
            lines = column.cast(pa.large_string()).combine_chunks()
        yield lines


def _first_bad_utf8_line(path: Path) -> tuple[int | None, str]:
    """Line and byte of the first invalid UTF-8 sequence (slow path, only used on error)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return lineno, f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
    except (EOFError, OSError, zlib.error):
        pass
    return None, "unknown position"


def _lines_buffer(lines: pa.Array) -> pa.Buffer:
    """The text of newline-terminated lines as one buffer (a zero-copy slice of the array's data)."""
    width = np.int64 if pa.types.is_large_string(lines.type) else np.int32
    offsets = np.frombuffer(lines.buffers()[1], dtype=width)[lines.offset : lines.offset + len(lines) + 1]
    return lines.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))


def _loose_type(t: pa.DataType) -> pa.DataType:
    """The schema type with every scalar as string (what the per-line parser produces)."""
    if pa.types.is_list(t):
        return pa.list_(_loose_type(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([(f.name, _loose_type(f.type)) for f in t])
    return pa.string()


def _loose_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([(f.name, _loose_type(f.type)) for f in schema])


def _coerce(value, t: pa.DataType):
    """A Python JSON value -> the loose type: scalars become their JSON text, wrong shapes become null."""
    if value is None:
        return None
    if pa.types.is_list(t):
        return [_coerce(v, t.value_type) for v in value] if isinstance(value, list) else None
    if pa.types.is_struct(t):
        return {f.name: _coerce(value.get(f.name), f.type) for f in t} if isinstance(value, dict) else None
    return value if isinstance(value, str) else json.dumps(value)


def _parse_slow(lines: pa.Array, numbers: np.ndarray, schema: pa.Schema, path: Path) -> pa.Table:
    """Parse each line with Python's json (exact errors, any value types), into the loose schema."""
    loose = _loose_schema(schema)
    rows = []
    for text, lineno in zip(lines.to_pylist(), numbers.tolist()):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RawDataError(path, f"not valid JSON ({exc.msg} at column {exc.colno})", lineno) from None
        if not isinstance(obj, dict):
            raise RawDataError(path, f"not a JSON object (found a JSON {type(obj).__name__})", lineno)
        rows.append({f.name: _coerce(obj.get(f.name), f.type) for f in loose})
    return pa.Table.from_pylist(rows, schema=loose)


def _parse_fast(lines: pa.Array, schema: pa.Schema) -> pa.Table | None:
    """Arrow's JSON reader on the whole batch; None when it fails or rows do not match lines 1:1."""
    data = _lines_buffer(lines)
    parse = paj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    block = _BLOCK_BYTES
    while True:
        try:
            table = paj.read_json(
                pa.BufferReader(data), read_options=paj.ReadOptions(block_size=block), parse_options=parse
            )
            break
        except pa.ArrowInvalid as exc:
            if "straddl" in str(exc) and block < data.size:
                block = min(data.size + 1, 2**31 - 1)
                continue
            return None
        except pa.ArrowNotImplementedError:
            return None
    # Two objects on one line give an extra row: only a 1:1 match keeps line numbers exact.
    return table if table.num_rows == len(lines) else None


def stream_json_lines(
    path: Path,
    schema: pa.Schema,
    batch_rows: int,
    *,
    required: tuple[str, ...] = (),
    what: str = "json lines",
    fast: bool = True,
) -> Iterator[JsonBatch]:
    """Stream a json-lines file (optionally gzipped) as tables of the loose ``schema``, with line numbers.

    Only the schema's keys are kept; a key absent from an object gives null. Blank lines are skipped.
    ``fast=False`` skips Arrow's reader and parses every line with Python's json (free-form values).
    Raises:
        RawDataError: missing or empty file, not UTF-8, truncated or corrupt gzip, a line that is not a
            JSON object, a ``required`` key absent from the first line and null in the first batch.
    """
    if not path.is_file():
        raise RawDataError(path, "file not found")
    if path.stat().st_size == 0:
        raise RawDataError(path, "file is empty")
    loose = _loose_schema(schema)
    line_offset = 0  # lines consumed before the current batch (blank ones included)
    seen_data = False
    warned_slow = False
    try:
        for batch in _stream_lines(path, batch_rows):
            numbers = np.arange(line_offset + 1, line_offset + 1 + len(batch), dtype=np.int64)
            line_offset += len(batch)
            if numbers[0] == 1 and len(batch) and batch[0].as_py().startswith("\ufeff"):
                batch = pa.concat_arrays([pa.array([batch[0].as_py()[1:]], batch.type), batch.slice(1)])
            nonblank = pc.invert(pc.match_substring_regex(batch, r"^\s*$")).to_numpy(zero_copy_only=False)
            if not nonblank.all():
                batch, numbers = batch.filter(pa.array(nonblank)), numbers[nonblank]
            if len(batch) == 0:
                continue
            table = _parse_fast(batch, schema) if fast else None
            if table is None:
                if fast and not warned_slow:
                    log.warning(
                        "%s: unexpected JSON value types (or bad lines) near line %d: parsing line by line",
                        path.name,
                        int(numbers[0]),
                    )
                    warned_slow = True
                table = _parse_slow(batch, numbers, schema, path)
            else:
                table = table.cast(loose)
            if not seen_data:
                _check_required(path, table, batch[0].as_py(), int(numbers[0]), required, what)
            seen_data = True
            yield JsonBatch(table, numbers)
    except UnicodeDecodeError as exc:
        line, where = _first_bad_utf8_line(path)
        raise RawDataError(path, f"not valid UTF-8 text ({where}): {exc.reason}", line) from None
    except (EOFError, OSError, zlib.error) as exc:
        kind = "truncated or corrupt gzip" if path.name.endswith(".gz") else "cannot read file"
        raise RawDataError(path, f"{kind} ({exc.__class__.__name__}: {exc})") from None
    if not seen_data:
        raise RawDataError(path, "file has no data rows")


def _check_required(
    path: Path, table: pa.Table, first_line: str, lineno: int, required: tuple[str, ...], what: str
) -> None:
    """A required key null on every row of the first batch and absent from its first line: wrong file."""
    for key in required:
        if table.column(key).null_count < table.num_rows:
            continue
        keys = list(json.loads(first_line))
        if key not in keys:
            raise RawDataError(
                path,
                f"key {key!r} missing: the first line has keys {keys}; not a GoodReads {what} file, "
                "or a renamed key / a different timestamp_field?",
                lineno,
            )


# ----------------------------------------------------------------------------------------------------------
# Vectorised value parsing


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


def _unique_sorted(values: np.ndarray) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------------------
# json layout


def _read_json_layout(
    raw_dir: Path,
    inter_files: list[Path],
    drops: DropLog,
    meta_drops: DropLog,
    batch_rows: int,
    options: GoodreadsOptions,
) -> RawData:
    book_files = _glob_files(raw_dir, options.books_glob)
    if not book_files:
        raise RawDataError(
            raw_dir,
            f"no book metadata matching {options.books_glob!r} next to the interaction files; "
            f"the folder holds {_listing(raw_dir)}",
        )
    names = [_rel(p, raw_dir) for p in inter_files]
    schema = interaction_schema(options.timestamp_field)
    ts_field = options.timestamp_field
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
                user_ok = pc.match_substring_regex(users, _USER_RE).to_numpy(zero_copy_only=False)
                item, item_ok = parse_ids(t.column("book_id").combine_chunks())
                rating, rating_bad = rating_checks(t.column("rating").combine_chunks())
                ts, ts_ok = parse_goodreads_dates(t.column(ts_field).combine_chunks())
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
    items, extra = _read_books(raw_dir, book_files, _unique_sorted(interactions.item), meta_drops, batch_rows)
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


# ----------------------------------------------------------------------------------------------------------
# Books


def bucket_pages(col: pa.Array) -> pa.Array:
    """num_pages strings -> bucket labels (``""`` when empty or not a positive integer)."""
    pages, ok = parse_ids(col)
    ok &= pages > 0
    labels = np.asarray(PAGE_LABELS, dtype=object)[np.digitize(pages, PAGE_EDGES)]
    return pa.array(np.where(ok, labels, ""), pa.string())


def bucket_avg_rating(col: pa.Array) -> pa.Array:
    """average_rating strings -> half-star buckets "3.5-4.0" (5.0 falls in "4.5-5.0"; ``""`` if invalid)."""
    values, valid, _ = parse_float(pc.fill_null(col.cast(pa.string()), ""))
    ok = valid & (values >= 0) & (values <= RATING_MAX)
    lo = np.minimum(np.floor(np.where(ok, values, 0) * 2) / 2, RATING_MAX - 0.5)
    labels = np.char.add(np.char.add(np.char.mod("%.1f", lo), "-"), np.char.mod("%.1f", lo + 0.5))
    return pa.array(np.where(ok, labels, ""), pa.string())


def top_shelf(shelves: pa.Array) -> pa.Array:
    """Per book, the most counted genre-like shelf name (first listed on ties; ``""`` when none)."""
    n = len(shelves)
    flat = pc.list_flatten(shelves)
    parent = pc.list_parent_indices(shelves).to_numpy(zero_copy_only=False)
    names = pc.utf8_lower(pc.utf8_trim_whitespace(pc.fill_null(pc.struct_field(flat, "name"), "")))
    count, count_ok = parse_ids(pc.struct_field(flat, "count"))
    usable = pc.and_(
        pc.invert(pc.is_in(names, value_set=pa.array(sorted(NON_GENRE_SHELVES)))), pc.not_equal(names, "")
    ).to_numpy(zero_copy_only=False)
    out = np.full(n, "", dtype=object)
    idx = np.flatnonzero(usable)
    if len(idx):
        count = np.where(count_ok, count, 0)[idx]
        order = np.lexsort((idx, -count, parent[idx]))  # by book, then count desc, then list position
        first = order[np.unique(parent[idx][order], return_index=True)[1]]
        out[parent[idx][first]] = names.take(pa.array(idx[first])).to_numpy(zero_copy_only=False)
    return pa.array(out, pa.string())


def first_author_ids(authors: pa.Array) -> pa.Array:
    """Per book, the ``author_id`` of the first listed author (``""`` when none)."""
    first = pc.list_slice(authors, 0, 1)
    ids = np.full(len(authors), "", dtype=object)
    parent = pc.list_parent_indices(first).to_numpy(zero_copy_only=False)
    values = pc.fill_null(pc.struct_field(pc.list_flatten(first), "author_id"), "")
    ids[parent] = values.to_numpy(zero_copy_only=False)
    return pa.array(ids, pa.string())


def _text(table: pa.Table, key: str) -> pa.Array:
    return pc.utf8_trim_whitespace(pc.fill_null(table.column(key).combine_chunks(), ""))


def _read_books(
    raw_dir: Path, book_files: list[Path], wanted: np.ndarray, meta_drops: DropLog, batch_rows: int
) -> tuple[pa.Table, list[Path]]:
    """Books some interaction refers to -> (items: item, title, genres, spec fields; extra files read)."""
    wanted_set = pa.array(wanted, pa.int64())
    parts, lines, sources = [], [], []
    names = [_rel(p, raw_dir) for p in book_files]
    book_rows = min(batch_rows, BOOK_BATCH_ROWS)
    for file_index, path in enumerate(book_files):
        name = names[file_index]
        for batch in stream_json_lines(path, BOOK_SCHEMA, book_rows, required=("book_id",), what="books"):
            t = batch.table
            ids, ok = parse_ids(t.column("book_id").combine_chunks())
            apply_checks([("item_id_invalid", ~ok)], batch.lines, name, meta_drops)
            keep = ok & pc.is_in(pa.array(ids), value_set=wanted_set).to_numpy(zero_copy_only=False)
            if not keep.any():
                continue
            t = t.filter(pa.array(keep))
            parts.append(
                pa.table(
                    {
                        "item": pa.array(ids[keep], pa.int64()),
                        "title": _text(t, "title"),
                        "author_id": first_author_ids(t.column("authors").combine_chunks()),
                        "publisher": _text(t, "publisher"),
                        "language": _text(t, "language_code"),
                        "format": _text(t, "format"),
                        "year": _text(t, "publication_year"),
                        "pages": bucket_pages(t.column("num_pages").combine_chunks()),
                        "avg_rating": bucket_avg_rating(t.column("average_rating").combine_chunks()),
                        "shelf": top_shelf(t.column("popular_shelves").combine_chunks()),
                    }
                )
            )
            lines.append(batch.lines[keep])
            sources.append(np.full(int(keep.sum()), file_index, dtype=np.int16))
    if parts:
        books = pa.concat_tables(parts)
        line, source = np.concatenate(lines), np.concatenate(sources)
    else:
        books = pa.table(
            {"item": pa.array([], pa.int64())} | {c: pa.array([], pa.string()) for c in _BOOK_COLS}
        )
        line, source = np.zeros(0, np.int64), np.zeros(0, np.int16)
    books = _dedupe_first(books, line, source, names, meta_drops)

    extra = []
    authors_path = raw_dir / AUTHORS_FILE
    author = books.column("author_id")
    if authors_path.is_file():
        author = _author_names(authors_path, author, batch_rows)
        extra.append(authors_path)
    genres = pa.array([""] * books.num_rows, pa.string())
    genres_path = raw_dir / GENRES_FILE
    if genres_path.is_file():
        genres = _book_genres(genres_path, books.column("item").combine_chunks(), batch_rows)
        extra.append(genres_path)
    items = pa.table(
        {"item": books.column("item"), "title": books.column("title"), "genres": genres, "author": author}
        | {f: books.column(f) for f in GOODREADS.item_fields if f != "author"}
    )
    return items, extra


def _dedupe_first(
    table: pa.Table, lines: np.ndarray, source: np.ndarray, names: list[str], meta_drops: DropLog
) -> pa.Table:
    """Keep the first row of each ``item`` (file order); count the others as ``duplicate_id``."""
    ids = table.column("item").to_numpy()
    _, first = np.unique(ids, return_index=True)
    if len(first) == len(ids):
        return table
    dup = np.ones(len(ids), dtype=bool)
    dup[first] = False
    meta_drops.add_mask("duplicate_id", dup, source, lines, names)
    return table.take(pa.array(np.sort(first)))


def _author_names(path: Path, author_ids: pa.ChunkedArray, batch_rows: int) -> pa.Array:
    """Replace author ids by names from the authors file where it has a non-empty name (first one wins)."""
    ids = pc.fill_null(author_ids.combine_chunks(), "")
    needed = pc.unique(ids)
    found_ids, found_names = [], []
    for batch in stream_json_lines(path, AUTHOR_SCHEMA, batch_rows, required=("author_id",), what="authors"):
        aid = _text(batch.table, "author_id")
        name = _text(batch.table, "name")
        hit = pc.and_(pc.is_in(aid, value_set=needed), pc.not_equal(name, ""))
        found_ids.append(aid.filter(hit))
        found_names.append(name.filter(hit))
    if not found_ids:
        return ids
    aid = pa.concat_arrays(found_ids)
    name = pa.concat_arrays(found_names)
    pos = pc.index_in(ids, value_set=aid)  # first occurrence wins
    return pc.if_else(pc.is_valid(pos), pc.take(name, pc.fill_null(pos, 0)), ids)


def _book_genres(path: Path, items: pa.Array, batch_rows: int) -> pa.Array:
    """``genres`` per item from goodreads_book_genres_initial: names by count, most first, ``|``-joined.

    The genre map has free keys (no fixed Arrow schema), so this small file is parsed line by line and
    the map kept as JSON text.
    """
    wanted = pa.array(items, pa.int64())
    found: dict[int, str] = {}
    schema = pa.schema([("book_id", pa.string()), ("genres", pa.string())])
    for batch in stream_json_lines(
        path, schema, batch_rows, required=("book_id",), what="book genres", fast=False
    ):
        ids, ok = parse_ids(batch.table.column("book_id").combine_chunks())
        hit = ok & pc.is_in(pa.array(ids), value_set=wanted).to_numpy(zero_copy_only=False)
        texts = batch.table.column("genres").combine_chunks().filter(pa.array(hit)).to_pylist()
        for book, text in zip(ids[hit].tolist(), texts):
            found.setdefault(book, _genres_text(text))
    return pa.array([found.get(i, "") for i in items.to_pylist()], pa.string())


def _genres_text(value: str | None) -> str:
    if not value:
        return ""
    try:
        counts = json.loads(value)
    except json.JSONDecodeError:
        return ""
    if not isinstance(counts, dict):
        return ""
    ranked = sorted(
        ((n, c) for n, c in counts.items() if isinstance(c, (int, float)) and c > 0), key=lambda nc: -nc[1]
    )
    return "|".join(n for n, _ in ranked)


# ----------------------------------------------------------------------------------------------------------
# csv layout


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
            jok = pc.match_substring_regex(jcol, _USER_RE).to_numpy(zero_copy_only=False)
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


def _read_csv_layout(
    raw_dir: Path,
    csv_path: Path,
    drops: DropLog,
    meta_drops: DropLog,
    batch_rows: int,
    options: GoodreadsOptions,
) -> RawData:
    log.warning(
        "%s has no timestamps: FILE ORDER stands in for time (timestamp = line number), so the temporal "
        "order and the train/valid/test split follow the file, not real dates",
        csv_path,
    )
    files = [csv_path]
    book_files = _glob_files(raw_dir, options.books_glob)
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

    name = _rel(csv_path, raw_dir)
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

    if book_map is not None:
        items, extra = _read_books(
            raw_dir, book_files, _unique_sorted(interactions.item), meta_drops, batch_rows
        )
        files += [*book_files, *extra]
    else:
        ids = _unique_sorted(interactions.item)
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

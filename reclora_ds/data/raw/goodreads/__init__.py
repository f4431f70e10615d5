"""GoodReads (UCSD Book Graph) reader: json.gz interactions with book metadata, or the integer-id csv.

Layouts of the UCSD files (globs come from :class:`~reclora_ds.data.config.GoodreadsOptions`):

* **json** (preferred): interaction files matching ``interactions_glob``
  (``goodreads_interactions_dedup.json.gz`` or per-genre ``goodreads_interactions_{genre}.json.gz``;
  several files are read in sorted order, and a row's file index is the position in that order) and book
  files matching ``books_glob`` (required). Optional next to them: ``goodreads_book_authors.json.gz``
  (author names) and ``goodreads_book_genres_initial.json.gz`` (the ``genres`` column).
* **csv** (fallback, used only when no json interaction file matches): ``goodreads_interactions.csv``
  (``user_id,book_id,is_read,rating,is_reviewed`` with integer ids), with ``book_id_map.csv`` and
  ``user_id_map.csv`` when present. It has **no timestamps**: each user's file order stands in for time
  (``csv_order``: by default a row's time is its user's progress through their rows, so the split is
  within every user's timeline; or the line number), not real dates (a warning is logged). How its ids
  map to the json ids: :mod:`~reclora_ds.data.raw.goodreads.interactions_csv`.

Decisions (documented here and in the drop reasons of ``metadata.json``): how times, ratings and ids are
parsed and when a row is dropped is in :mod:`~reclora_ds.data.raw.goodreads.parsing`; which books are
kept and how the item fields are derived in :mod:`~reclora_ds.data.raw.goodreads.books`. Besides:

* Missing keys: a key absent from one object counts like an empty value (the row is dropped under that
  field's reason: ``user_id_invalid``, ``item_id_invalid``, ``rating_missing``, ``timestamp_invalid``). A
  required key absent from the first line and empty in the whole first batch of a file is a
  :class:`RawDataError` (a renamed key, the wrong ``timestamp_field`` or the wrong kind of file).
* Structural problems are :class:`RawDataError` naming the file (and line): no matching files (the folder's
  contents are listed), an empty file, a truncated or corrupt gzip, a line that is not a JSON object,
  bytes that are not UTF-8, an interaction file none of whose rows is usable (the message gives the count
  and first line of each reason, as the MovieLens readers do). Blank lines are skipped and not counted;
  line numbers stay exact.

Modules: ``interactions_json`` and ``interactions_csv`` (one per layout), ``books`` (books metadata),
``jsonl`` (line-exact JSON-lines streaming), ``parsing`` (vectorised value checks and drop accounting).
"""

from __future__ import annotations

from pathlib import Path

from reclora_ds.data.config import GoodreadsOptions
from reclora_ds.data.errors import DropLog, RawDataError
from reclora_ds.data.raw.base import RawData
from reclora_ds.data.raw.goodreads.interactions_csv import CSV_NAME, read_csv_layout
from reclora_ds.data.raw.goodreads.interactions_json import read_json_layout

__all__ = ["read_goodreads"]


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
    book_files = _glob_files(raw_dir, options.books_glob)
    if json_files:
        if not book_files:
            raise RawDataError(
                raw_dir,
                f"no book metadata matching {options.books_glob!r} next to the interaction files; "
                f"the folder holds {_listing(raw_dir)}",
            )
        return read_json_layout(
            raw_dir, json_files, book_files, drops, meta_drops, batch_rows, options.timestamp_field
        )
    csv_path = raw_dir / CSV_NAME
    if csv_path.is_file():
        return read_csv_layout(raw_dir, csv_path, book_files, drops, meta_drops, batch_rows, options.csv_order)
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

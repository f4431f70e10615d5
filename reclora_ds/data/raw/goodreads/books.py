"""GoodReads books metadata: the items some interaction refers to, with their text and category fields.

Decisions: only books some interaction refers to are kept (the others are skipped, so their repeats are not
counted); a repeated ``book_id`` keeps the first (``duplicate_id`` in the metadata drops); a book id that is
not digits is ``item_id_invalid`` there; a book without a title is ``title_missing`` there (its ratings
then count as ``unknown_item``). Books files none of whose books an interaction rates are a
:class:`RawDataError` (another dataset's or genre's books), before any interaction is dropped for it. Other book keys, when absent, count as empty strings.

Item fields (strings; ``""`` when unknown): ``author`` (name of the first listed author from the authors
file, else its ``author_id``), ``publisher``, ``language`` (``language_code``), ``format``, ``year``
(``publication_year``), ``pages`` (``num_pages`` bucketed: ``<100``, ``100-199``, ..., ``1000+``),
``avg_rating`` (``average_rating`` in half-star buckets such as ``3.5-4.0``), ``shelf`` (the most counted
``popular_shelves`` name that is not a status/ownership shelf such as ``to-read``; see
:data:`NON_GENRE_SHELVES`), plus ``title`` and ``genres`` (``|``-separated, most counted first), from the
optional ``goodreads_book_authors.json.gz`` and ``goodreads_book_genres_initial.json.gz`` next to the books.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reclora_ds.data.errors import DropLog, RawDataError
from reclora_ds.data.raw.delimited import parse_float
from reclora_ds.data.raw.goodreads.jsonl import stream_json_lines
from reclora_ds.data.raw.goodreads.parsing import RATING_MAX, apply_checks, parse_ids, rel_name
from reclora_ds.data.specs import GOODREADS

AUTHORS_FILE = "goodreads_book_authors.json.gz"
GENRES_FILE = "goodreads_book_genres_initial.json.gz"

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


def read_books(
    raw_dir: Path, book_files: list[Path], wanted: np.ndarray, meta_drops: DropLog, batch_rows: int
) -> tuple[pa.Table, list[Path]]:
    """Books some interaction refers to -> (items: item, title, genres, spec fields; extra files read)."""
    wanted_set = pa.array(wanted, pa.int64())
    parts, lines, sources = [], [], []
    names = [rel_name(p, raw_dir) for p in book_files]
    book_rows = min(batch_rows, BOOK_BATCH_ROWS)
    matched_any = False
    for file_index, path in enumerate(book_files):
        name = names[file_index]
        for batch in stream_json_lines(path, BOOK_SCHEMA, book_rows, required=("book_id",), what="books"):
            t = batch.table
            ids, ok = parse_ids(t.column("book_id").combine_chunks())
            apply_checks([("item_id_invalid", ~ok)], batch.lines, name, meta_drops)
            keep = ok & pc.is_in(pa.array(ids), value_set=wanted_set).to_numpy(zero_copy_only=False)
            matched_any |= bool(keep.any())
            untitled = keep & pc.equal(_text(t, "title"), "").to_numpy(zero_copy_only=False)
            if untitled.any():
                meta_drops.add_lines("title_missing", untitled, batch.lines, name)
                keep &= ~untitled
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
    if not matched_any and len(wanted):
        raise RawDataError(
            book_files[0] if len(book_files) == 1 else raw_dir,
            f"no book of {', '.join(names)} is one the interactions rate ({len(wanted):,} book ids, e.g. "
            f"{', '.join(map(str, wanted[:3].tolist()))}): books of another dataset or genre?",
        )
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

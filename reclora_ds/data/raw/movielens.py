"""MovieLens readers: the ML-25M layout (csv; also ml-latest-small) and the ML-1M layout (``::`` .dat).

ML-25M: ``ratings.csv`` (userId,movieId,rating,timestamp; half stars 0.5..5.0) and ``movies.csv``
(movieId,title,genres; quoted titles with commas, genres separated by ``|``).
ML-1M: ``ratings.dat`` (UserID::MovieID::Rating::Timestamp), ``users.dat``
(UserID::Gender::Age::Occupation::Zip-code) and ``movies.dat`` (MovieID::Title::Genres, ISO-8859-1; a copy
re-saved as UTF-8 is detected and read as UTF-8).

Checks of the metadata (``metadata_drops`` in metadata.json; ``strict`` turns each into an error): a movie
without a title is ``title_missing``; an ML-1M user whose gender is not M/F, age not one of the README's
codes (1, 18, 25, 35, 45, 50, 56) or occupation not 0..20 is ``user_field_invalid`` (their ratings then
count as ``unknown_user``). A title or genre holding a control character is a :class:`RawDataError` naming
the file and line: the file is in another encoding (e.g. Windows-1252 read as ISO-8859-1).
The item field ``genre`` is the first listed genre (as in the paper's field lists).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reclora_ds.data.errors import DropLog, RawDataError
from reclora_ds.data.raw.base import InteractionBuffer, RawData
from reclora_ds.data.raw.delimited import csv_line_pattern, parse_int, read_delimited, unquote_csv
from reclora_ds.data.raw.ratings import read_rating_rows
from reclora_ds.data.specs import ML_1M, ML_25M
from reclora_ds.data.text import ML1M_AGES, ML1M_GENDERS, ML1M_OCCUPATIONS

# C0 controls other than tab, DEL and the C1 controls (0x80-0x9f): never in a MovieLens title or genre. A
# Windows-1252 file read as ISO-8859-1 turns its curly quotes and dashes into C1 controls.
_CONTROL_RE = "[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f]"

ML25M_RATINGS_HEADER = ["userId", "movieId", "rating", "timestamp"]
ML25M_MOVIES_HEADER = ["movieId", "title", "genres"]


def require_files(raw_dir: Path, names: list[str], layout: str) -> list[Path]:
    """Paths of ``names`` in ``raw_dir``; one error listing every missing file."""
    if not raw_dir.is_dir():
        raise RawDataError(
            raw_dir, f"raw data folder not found (expected the {layout} layout: {', '.join(names)})"
        )
    missing = [n for n in names if not (raw_dir / n).is_file()]
    if missing:
        raise RawDataError(
            raw_dir, f"missing {', '.join(missing)}; the {layout} layout needs {', '.join(names)}"
        )
    return [raw_dir / n for n in names]


def first_genre(genres: pa.Array) -> pa.Array:
    """'Adventure|Animation|Children' -> 'Adventure'."""
    return pc.list_element(pc.split_pattern(genres, "|"), 0)


def _dedupe_items(table: pa.Table, key: str, lines: np.ndarray, name: str, meta_drops: DropLog) -> pa.Table:
    ids = table.column(key).to_numpy()
    _, first = np.unique(ids, return_index=True)
    if len(first) < len(ids):
        dup = np.ones(len(ids), dtype=bool)
        dup[first] = False
        meta_drops.add_lines("duplicate_id", dup, lines, name)
        table = table.take(pa.array(np.sort(first)))
    return table


def _read_ml25m_movies(path: Path, meta_drops: DropLog) -> pa.Table:
    """movies.csv -> table(item, title, genres, genre).

    Lines are matched against a one-line csv regex (quoted titles may hold commas and doubled quotes), so
    every row keeps its exact line number: a line that is not three csv fields is a ``malformed_line`` in
    the metadata drops (MovieLens titles never span lines).
    """
    cols, lines = _read_table(
        path,
        ["item", "title", "genres"],
        meta_drops,
        delimiter=",",
        header=ML25M_MOVIES_HEADER,
        pattern=csv_line_pattern(["item", "title", "genres"]),
    )
    cols = {f: unquote_csv(c) for f, c in cols.items()}
    check_control_characters(path, {"title": cols["title"], "genres": cols["genres"]}, lines, "UTF-8")
    return _items_table(path, cols, lines, meta_drops)


def check_control_characters(path: Path, cols: dict[str, pa.Array], lines: np.ndarray, encoding: str) -> None:
    """A RawDataError at the first line whose text holds a control character (wrong encoding)."""
    for field, col in cols.items():
        bad = pc.match_substring_regex(pc.fill_null(col, ""), _CONTROL_RE).to_numpy(zero_copy_only=False)
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            char = next(c for c in col[k].as_py() if re.match(_CONTROL_RE, c))
            raise RawDataError(
                path,
                f"control character U+{ord(char):04X} in the {field}: the file is not {encoding} text "
                "(Windows-1252? convert it to UTF-8 or ISO-8859-1)",
                int(lines[k]),
            )


def _items_table(path: Path, cols: dict[str, pa.Array], lines: np.ndarray, meta_drops: DropLog) -> pa.Table:
    """Columns item, title, genres (strings) -> table(item, title, genres, genre) without bad or repeated ids,
    or items without a title."""
    ids, ok = parse_int(cols["item"])
    if not ok.all():
        meta_drops.add_lines("item_id_invalid", ~ok, lines, path.name)
    untitled = ok & pc.equal(pc.utf8_trim_whitespace(pc.fill_null(cols["title"], "")), "").to_numpy(
        zero_copy_only=False
    )
    if untitled.any():
        meta_drops.add_lines("title_missing", untitled, lines, path.name)
        ok = ok & ~untitled
    mask = pa.array(ok)
    genres = cols["genres"].filter(mask)
    items = pa.table(
        {
            "item": pa.array(ids[ok], pa.int64()),
            "title": cols["title"].filter(mask),
            "genres": genres,
            "genre": first_genre(genres),
        }
    )
    return _dedupe_items(items, "item", lines[ok], path.name, meta_drops)


def read_ml25m(raw_dir: Path, drops: DropLog, meta_drops: DropLog, batch_rows: int) -> RawData:
    """Read a MovieLens-25M-layout folder (ml-25m, ml-20m, ml-latest, ml-latest-small)."""
    ratings_path, movies_path = require_files(raw_dir, ["ratings.csv", "movies.csv"], "MovieLens-25M")
    items = _read_ml25m_movies(movies_path, meta_drops)
    buffer = InteractionBuffer()
    read_rating_rows(
        ratings_path,
        ML_25M,
        drops,
        buffer,
        file_index=0,
        delimiter=",",
        header=ML25M_RATINGS_HEADER,
        batch_rows=batch_rows,
    )
    return RawData(
        dataset="ml-25m",
        interactions=buffer.build(),
        items=items,
        users=None,
        raw_rows=buffer.rows_read,
        files=[ratings_path, movies_path],
        file_names=[ratings_path.name],
        drops=drops,
    )


def _read_table(
    path: Path,
    fields: list[str],
    meta_drops: DropLog,
    *,
    delimiter: str = "::",
    encoding: str = "utf-8",
    header: list[str] | None = None,
    pattern: str | None = None,
) -> tuple[dict[str, pa.Array], np.ndarray]:
    """A whole (small) metadata file as string columns plus the line number of each row."""
    cols: dict[str, list[pa.Array]] = {f: [] for f in fields}
    lines = []
    for batch in read_delimited(
        path, fields, delimiter, meta_drops, header=header, encoding=encoding, pattern=pattern
    ):
        for f in fields:
            cols[f].append(batch.columns[f])
        lines.append(batch.lines)
    return {f: pa.concat_arrays(v) for f, v in cols.items()}, np.concatenate(lines)


def movies_dat_encoding(path: Path) -> str:
    """ML-1M ships movies.dat in ISO-8859-1; a copy re-saved as UTF-8 (valid UTF-8 bytes) is read as UTF-8.

    ISO-8859-1 accents (e.g. 0xe9 followed by ASCII) are never valid UTF-8, and pure ASCII reads the same
    either way, so the check cannot turn a real ML-1M title into mojibake.
    """
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return "iso-8859-1"
    return "utf-8"


def read_ml1m(raw_dir: Path, drops: DropLog, meta_drops: DropLog, batch_rows: int) -> RawData:
    """Read a MovieLens-1M folder: ratings.dat, users.dat, movies.dat (ISO-8859-1)."""
    ratings_path, users_path, movies_path = require_files(
        raw_dir, ["ratings.dat", "users.dat", "movies.dat"], "MovieLens-1M"
    )
    encoding = movies_dat_encoding(movies_path)
    mcols, mlines = _read_table(movies_path, ["item", "title", "genres"], meta_drops, encoding=encoding)
    check_control_characters(
        movies_path, {"title": mcols["title"], "genres": mcols["genres"]}, mlines, encoding.upper()
    )
    items = _items_table(movies_path, mcols, mlines, meta_drops)

    ucols, ulines = _read_table(users_path, ["user", "gender", "age", "occupation", "zipcode"], meta_drops)
    uids, uok = parse_int(ucols["user"])
    if not uok.all():
        meta_drops.add_lines("user_id_invalid", ~uok, ulines, users_path.name)
    codes_ok = (
        pc.is_in(ucols["gender"], value_set=pa.array(sorted(ML1M_GENDERS))).to_numpy(zero_copy_only=False)
        & pc.is_in(ucols["age"], value_set=pa.array(sorted(ML1M_AGES))).to_numpy(zero_copy_only=False)
        & pc.is_in(
            ucols["occupation"], value_set=pa.array([str(k) for k in range(len(ML1M_OCCUPATIONS))])
        ).to_numpy(zero_copy_only=False)
    )
    bad_codes = uok & ~codes_ok
    if bad_codes.any():
        meta_drops.add_lines("user_field_invalid", bad_codes, ulines, users_path.name)
        uok = uok & ~bad_codes
    umask = pa.array(uok)
    users = pa.table(
        {"user": pa.array(uids[uok], pa.int64())} | {f: ucols[f].filter(umask) for f in ML_1M.user_fields}
    )
    users = _dedupe_items(users, "user", ulines[uok], users_path.name, meta_drops)

    buffer = InteractionBuffer()
    read_rating_rows(
        ratings_path, ML_1M, drops, buffer, file_index=0, delimiter="::", header=None, batch_rows=batch_rows
    )
    return RawData(
        dataset="ml-1m",
        interactions=buffer.build(),
        items=items,
        users=users,
        raw_rows=buffer.rows_read,
        files=[ratings_path, users_path, movies_path],
        file_names=[ratings_path.name],
        drops=drops,
    )

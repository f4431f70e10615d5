"""MovieLens readers: the ML-25M layout (csv; also ml-latest-small) and the ML-1M layout (``::`` .dat).

ML-25M: ``ratings.csv`` (userId,movieId,rating,timestamp; half stars 0.5..5.0) and ``movies.csv``
(movieId,title,genres; quoted titles with commas, genres separated by ``|``).
ML-1M: ``ratings.dat`` (UserID::MovieID::Rating::Timestamp), ``users.dat``
(UserID::Gender::Age::Occupation::Zip-code) and ``movies.dat`` (MovieID::Title::Genres, ISO-8859-1).
The item field ``genre`` is the first listed genre (as in the paper's field lists).
"""

from __future__ import annotations

import csv
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reclora_ds.data.errors import DropLog, RawDataError
from reclora_ds.data.raw.base import InteractionBuffer, RawData
from reclora_ds.data.raw.delimited import parse_int, read_delimited
from reclora_ds.data.raw.ratings import read_rating_rows
from reclora_ds.data.specs import ML_1M, ML_25M

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
        meta_drops.add("duplicate_row", int(dup.sum()), [f"{name}:{int(n)}" for n in lines[dup][:5]])
        table = table.take(pa.array(np.sort(first)))
    return table


def _read_ml25m_movies(path: Path, meta_drops: DropLog) -> pa.Table:
    """movies.csv -> table(item, title, genres, genre). Quoted titles are parsed by the csv builder."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), None)
    if header is None:
        raise RawDataError(path, "file is empty")
    header = [h.strip().lstrip("\ufeff") for h in header]
    if header != ML25M_MOVIES_HEADER:
        missing = [c for c in ML25M_MOVIES_HEADER if c not in header]
        raise RawDataError(
            path, f"header {header} does not match {ML25M_MOVIES_HEADER}; missing {missing}", 1
        )
    features = datasets.Features({c: datasets.Value("string") for c in ML25M_MOVIES_HEADER})
    try:
        ds = datasets.load_dataset(
            "csv",
            data_files=str(path),
            split="train",
            streaming=True,
            features=features,
            keep_default_na=False,
        ).with_format("arrow")
        table = pa.concat_tables(list(ds.iter(batch_size=100_000)))
    except UnicodeDecodeError as exc:
        from reclora_ds.data.raw.delimited import first_bad_utf8_line

        line, where = first_bad_utf8_line(path)
        raise RawDataError(path, f"not valid UTF-8 text ({where}): {exc.reason}", line) from None
    except Exception as exc:  # the csv builder wraps pandas parser errors in its own types
        raise RawDataError(path, f"cannot parse as csv: {exc}") from None
    if table.num_rows == 0:
        raise RawDataError(path, "file has no data rows")
    lines = np.arange(2, table.num_rows + 2, dtype=np.int64)  # header is line 1; titles hold no newlines
    ids, ok = parse_int(table.column("movieId").combine_chunks())
    if not ok.all():
        meta_drops.add("item_id_invalid", int((~ok).sum()), [f"{path.name}:{int(n)}" for n in lines[~ok][:5]])
    genres = table.column("genres").combine_chunks().filter(pa.array(ok))
    items = pa.table(
        {
            "item": pa.array(ids[ok], pa.int64()),
            "title": table.column("title").combine_chunks().filter(pa.array(ok)),
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


def _read_dat_table(
    path: Path, fields: list[str], meta_drops: DropLog, encoding: str
) -> tuple[dict[str, pa.Array], np.ndarray]:
    cols: dict[str, list[pa.Array]] = {f: [] for f in fields}
    lines = []
    for batch in read_delimited(path, fields, "::", meta_drops, encoding=encoding):
        for f in fields:
            cols[f].append(batch.columns[f])
        lines.append(batch.lines)
    return {f: pa.concat_arrays(v) for f, v in cols.items()}, np.concatenate(lines)


def read_ml1m(raw_dir: Path, drops: DropLog, meta_drops: DropLog, batch_rows: int) -> RawData:
    """Read a MovieLens-1M folder: ratings.dat, users.dat, movies.dat (ISO-8859-1)."""
    ratings_path, users_path, movies_path = require_files(
        raw_dir, ["ratings.dat", "users.dat", "movies.dat"], "MovieLens-1M"
    )
    mcols, mlines = _read_dat_table(movies_path, ["item", "title", "genres"], meta_drops, "iso-8859-1")
    ids, ok = parse_int(mcols["item"])
    if not ok.all():
        meta_drops.add(
            "item_id_invalid", int((~ok).sum()), [f"{movies_path.name}:{int(n)}" for n in mlines[~ok][:5]]
        )
    mask = pa.array(ok)
    items = pa.table(
        {
            "item": pa.array(ids[ok], pa.int64()),
            "title": mcols["title"].filter(mask),
            "genres": mcols["genres"].filter(mask),
            "genre": first_genre(mcols["genres"].filter(mask)),
        }
    )
    items = _dedupe_items(items, "item", mlines[ok], movies_path.name, meta_drops)

    ucols, ulines = _read_dat_table(
        users_path, ["user", "gender", "age", "occupation", "zipcode"], meta_drops, "utf-8"
    )
    uids, uok = parse_int(ucols["user"])
    if not uok.all():
        meta_drops.add(
            "user_id_invalid", int((~uok).sum()), [f"{users_path.name}:{int(n)}" for n in ulines[~uok][:5]]
        )
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

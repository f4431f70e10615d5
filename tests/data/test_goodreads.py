"""GoodReads reader: the real csv slice end to end, hand-checked json.gz fixtures, and malformed inputs.

json.gz fixtures are written here, following the UCSD schema exactly (every key present, values often "").
Expected values are worked out by hand in the comments (epoch seconds of dates with UTC offsets).
"""

from __future__ import annotations

import csv
import gzip
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reclora_ds.data.config import GoodreadsOptions, PrepareConfig
from reclora_ds.data.errors import DropLog, RawDataError
from reclora_ds.data.prepare import prepare_dataset
from reclora_ds.data.preprocess import prepare
from reclora_ds.data.raw.goodreads import read_goodreads
from reclora_ds.data.raw.goodreads.interactions_csv import user_progress_times
from reclora_ds.data.raw.goodreads.parsing import DATE_FORMAT, parse_goodreads_dates
from reclora_ds.data.specs import GOODREADS

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "goodreads"
INTER = "goodreads_interactions_dedup.json.gz"
BOOKS = "goodreads_books.json.gz"
AUTHORS = "goodreads_book_authors.json.gz"
GENRES = "goodreads_book_genres_initial.json.gz"

U1 = "8842281e1d1347389f2ab93d60773d4d"
U2 = "0123456789abcdef0123456789abcdef"
U3 = "fedcba9876543210fedcba9876543210"


# ----------------------------------------------------------------------------------------------------------
# Fixture writers: every key of the UCSD schema, values often empty.


def interaction(user: str, book: str, rating, date_added: str, date_updated: str = "", **extra) -> dict:
    row = {
        "user_id": user,
        "book_id": book,
        "review_id": "5cd416f3efc3f944fce4ce2db2290d5e",
        "is_read": True,
        "rating": rating,
        "review_text_incomplete": "",
        "date_added": date_added,
        "date_updated": date_updated or date_added,
        "read_at": "",
        "started_at": "",
    }
    row.update(extra)
    return row


def book(book_id: str, **fields) -> dict:
    row = {
        "isbn": "",
        "text_reviews_count": "1",
        "series": [],
        "country_code": "US",
        "language_code": "",
        "popular_shelves": [],
        "asin": "",
        "is_ebook": "false",
        "average_rating": "",
        "kindle_asin": "",
        "similar_books": [],
        "description": "",
        "format": "",
        "link": f"https://www.goodreads.com/book/show/{book_id}",
        "authors": [],
        "publisher": "",
        "num_pages": "",
        "publication_day": "",
        "isbn13": "",
        "publication_month": "",
        "edition_information": "",
        "publication_year": "",
        "url": f"https://www.goodreads.com/book/show/{book_id}",
        "image_url": "",
        "book_id": book_id,
        "ratings_count": "3",
        "work_id": "",
        "title": f"Book {book_id}",
        "title_without_series": f"Book {book_id}",
    }
    row.update(fields)
    return row


def write_jsonl_gz(path: Path, rows: list) -> Path:
    """Rows are dicts (one JSON line each), str (a raw line) or bytes (raw bytes of a line)."""
    data = b"".join(
        (r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n"
        for r in rows
    )
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


def dates(n: int) -> list[str]:
    """n increasing GoodReads dates one day apart, from Fri Jan 01 2016 (offset -0800)."""
    day0 = datetime(2016, 1, 1, tzinfo=timezone.utc)
    return [(day0 + timedelta(days=k)).strftime("%a %b %d 10:00:00 -0800 %Y") for k in range(n)]


BASE_DATES = dates(12)
# 12 good rows, 3 users, books 101..104: lines 1..12 of the interaction file.
BASE_ROWS = [interaction([U1, U2, U3][k % 3], str(101 + k % 4), 1 + k % 5, BASE_DATES[k]) for k in range(12)]
BASE_BOOKS = [book(str(i)) for i in (101, 102, 103, 104)]


def make_json_dir(root: Path, rows: list, books: list | None = None) -> Path:
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(raw / INTER, rows)
    write_jsonl_gz(raw / BOOKS, BASE_BOOKS if books is None else books)
    return raw


def run(raw: Path, root: Path, **cfg):
    cfg = {"min_history": 0, "few_shot_size": 5, "shards_per_split": 1} | cfg
    return prepare_dataset(
        PrepareConfig(dataset="goodreads", raw_dir=str(raw), output_dir=str(root / "out"), **cfg)
    )


def assert_accounting(result) -> None:
    acc = result.metadata["accounting"]
    assert acc["raw_rows"] == acc["samples"] + acc["dropped"]
    assert acc["dropped"] == sum(d["count"] for d in result.metadata["drops"].values())


# ----------------------------------------------------------------------------------------------------------
# The vendored real csv slice, end to end


def test_real_csv_slice_end_to_end(tmp_path):
    result = prepare_dataset(
        PrepareConfig(
            dataset="goodreads",
            raw_dir=str(FIXTURE_DIR),
            output_dir=str(tmp_path / "out"),
            few_shot_size=1000,
        )
    )
    meta = result.metadata
    with open(FIXTURE_DIR / "goodreads_interactions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20_000
    assert meta["counts"]["raw_rows"] == 20_000
    acc = meta["accounting"]
    assert acc["raw_rows"] == acc["samples"] + acc["dropped"] == 20_000
    unrated = sum(r["rating"] == "0" for r in rows)
    assert meta["drops"]["unrated_shelf"]["count"] == unrated == 12_622
    assert set(meta["drops"]) == {"unrated_shelf", "history_only"}  # the real slice has no other problem
    # csv_order=user_progress (the default): the k-th of a user's n rated rows (file order) has the time
    # k * 10^9 // n, written here as a loop over the csv; each user's timeline is their rows in file order.
    rated: dict[int, list[dict]] = {}
    for r in rows:
        if r["rating"] != "0":
            rated.setdefault(int(r["user_id"]), []).append(r)
    timelines = pq.read_table(tmp_path / "out" / "timelines.parquet").to_pylist()
    users = pq.read_table(tmp_path / "out" / "users.parquet").column("user").to_pylist()
    assert len(timelines) == 20_000 - unrated
    per_user: dict[int, list[dict]] = {}
    for t in timelines:
        per_user.setdefault(users[t["user_index"]], []).append(t)
    assert per_user.keys() == rated.keys()
    for user, timeline in per_user.items():
        timeline.sort(key=lambda t: t["timestamp"])
        n = len(rated[user])
        assert [t["timestamp"] for t in timeline] == [k * 10**9 // n for k in range(n)]
        assert [t["rating"] for t in timeline] == [int(r["rating"]) for r in rated[user]]
        assert [t["label"] for t in timeline] == [int(r["rating"]) >= 4 for r in rated[user]]
    # Every user with enough rows has samples in all three splits (the split lies within timelines).
    samples = {
        split: pq.read_table(sorted((tmp_path / "out" / "samples").glob(f"{split}-*.parquet")))
        .column("user_index")
        .to_pylist()
        for split in ("train", "valid", "test")
    }
    long_users = {i for i, u in enumerate(users) if len(rated[u]) >= 40}
    for split in ("train", "valid", "test"):
        assert long_users <= set(samples[split]), split
    items = pq.read_table(tmp_path / "out" / "items.parquet")
    assert set(items.column("shelf").to_pylist()) == {""}  # no book metadata next to the csv


def test_real_csv_slice_in_file_order(tmp_path):
    """csv_order=file: the time is the csv line (header = line 1, so data row k is line k + 2)."""
    prepare_dataset(
        PrepareConfig(
            dataset="goodreads",
            raw_dir=str(FIXTURE_DIR),
            output_dir=str(tmp_path / "out"),
            few_shot_size=1000,
            goodreads=GoodreadsOptions(csv_order="file"),
        )
    )
    with open(FIXTURE_DIR / "goodreads_interactions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    timelines = pq.read_table(tmp_path / "out" / "timelines.parquet").to_pydict()
    assert len(timelines["timestamp"]) == sum(r["rating"] != "0" for r in rows)
    for line, label, rating in zip(timelines["timestamp"], timelines["label"], timelines["rating"]):
        raw = rows[line - 2]
        assert int(raw["rating"]) == rating
        assert label == (int(raw["rating"]) >= 4)


def test_user_progress_times_against_a_loop():
    rng = np.random.default_rng(0)
    user = rng.integers(0, 7, 300)
    line = rng.permutation(1000)[:300] + 2
    expected = {}
    for u in set(user.tolist()):
        lines = sorted(line[user == u].tolist())
        expected |= {(u, ln): k * 10**9 // len(lines) for k, ln in enumerate(lines)}
    got = user_progress_times(user, line)
    assert got.tolist() == [expected[(u, ln)] for u, ln in zip(user.tolist(), line.tolist())]


def test_unknown_csv_order_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="csv_order"):
        GoodreadsOptions(csv_order="time")


# ----------------------------------------------------------------------------------------------------------
# Hand-checked json fixture

# Aug 01 2016 00:00:00 UTC = 1470009600.
HAND_ROWS = [
    interaction(U1, "101", 5, "Mon Aug 01 13:00:00 -0700 2016"),  # line 1: 20:00 UTC -> 1470081600
    interaction(
        U2, "102", 4, "Mon Aug 01 15:00:00 +0000 2016"
    ),  # line 2: 15:00 UTC -> 1470063600 (before line 1)
    interaction(U1, "102", 0, "Mon Aug 01 16:00:00 +0000 2016"),  # line 3: rating 0 -> unrated_shelf
    interaction(U1, "103", 3, "Tue Aug 02 09:00:00 +0530 2016"),  # line 4: Aug 02 03:30 UTC -> 1470108600
    interaction(U2, "101", 2, "Sun Jul 31 23:00:00 -0100 2016"),  # line 5: Aug 01 00:00 UTC -> 1470009600
    interaction(U2.upper(), "104", 5, "Wed Aug 03 12:00:00 +0000 2016"),  # line 6: U2 again -> 1470225600
    interaction(U1, "104", 1, "Thu Aug 04 00:00:00 +1400 2016"),  # line 7: Aug 03 10:00 UTC -> 1470218400
]
HAND_BOOKS = [
    book(
        "101",
        title="The Hobbit",
        authors=[{"author_id": "656983", "role": ""}, {"author_id": "7", "role": "Illustrator"}],
        publisher="Houghton Mifflin",
        language_code="eng",
        format="Paperback",
        publication_year="1937",
        num_pages="310",
        average_rating="4.27",
        popular_shelves=[
            {"count": "900", "name": "to-read"},
            {"count": "300", "name": "fantasy"},
            {"count": "300", "name": "classics"},  # tie with fantasy: the first listed wins
            {"count": "950", "name": "favorites"},
        ],
    ),
    book("102", title="Untitled", popular_shelves=[{"count": "10", "name": "to-read"}]),
    book(
        "103",
        title="Poems",
        authors=[{"author_id": "999", "role": ""}],  # not in the authors file: the id stays
        num_pages="99",
        average_rating="5.00",
        popular_shelves=[
            {"count": "5", "name": "poetry"},
            {"count": "7", "name": "currently-reading"},
            {"count": "6", "name": "Classics"},
        ],
    ),
    book("104", title="Big Book", num_pages="1200", average_rating="3.00", publication_year="2001"),
    book("105", title="Never read"),  # no interaction: skipped
    book("101", title="The Hobbit (again)"),  # line 6: repeated id -> metadata duplicate_row, first kept
]
HAND_AUTHORS = [
    {
        "author_id": "656983",
        "average_rating": "4.3",
        "text_reviews_count": "1",
        "name": "J.R.R. Tolkien",
        "ratings_count": "9",
    },
    {
        "author_id": "7",
        "average_rating": "4.0",
        "text_reviews_count": "1",
        "name": "Alan Lee",
        "ratings_count": "9",
    },
]
HAND_GENRES = [{"book_id": "101", "genres": {"fantasy, paranormal": 30, "fiction": 50, "children": 0}}]


def make_hand_dir(root: Path) -> Path:
    raw = root / "raw"
    raw.mkdir(parents=True)
    write_jsonl_gz(raw / INTER, HAND_ROWS)
    write_jsonl_gz(raw / BOOKS, HAND_BOOKS)
    write_jsonl_gz(raw / AUTHORS, HAND_AUTHORS)
    write_jsonl_gz(raw / GENRES, HAND_GENRES)
    return raw


def test_json_hand_checked(tmp_path):
    raw = make_hand_dir(tmp_path)
    drops, meta_drops = DropLog(), DropLog()
    data = read_goodreads(raw, drops, meta_drops, batch_rows=2, options=GoodreadsOptions())
    assert data.raw_rows == 7
    assert drops.counts == {"unrated_shelf": 1}
    assert drops.examples["unrated_shelf"] == [f"{INTER}:3"]
    assert meta_drops.counts == {"duplicate_id": 1}
    assert meta_drops.examples["duplicate_id"] == [f"{BOOKS}:6"]
    assert data.user_keys == [U1, U2]  # order of first appearance; upper-case U2 is the same user
    inter = data.interactions
    assert inter.line.tolist() == [1, 2, 4, 5, 6, 7]
    assert inter.user.tolist() == [0, 1, 0, 1, 1, 0]
    assert inter.item.tolist() == [101, 102, 103, 101, 104, 104]
    assert inter.timestamp.tolist() == [
        1470081600,
        1470063600,
        1470108600,
        1470009600,
        1470225600,
        1470218400,
    ]
    assert data.file_names == [INTER]
    assert [p.name for p in data.files] == [INTER, BOOKS, AUTHORS, GENRES]

    items = {r["item"]: r for r in data.items.to_pylist()}
    assert sorted(items) == [101, 102, 103, 104]
    assert items[101] == {
        "item": 101,
        "title": "The Hobbit",
        "genres": "fiction|fantasy, paranormal",
        "author": "J.R.R. Tolkien",
        "publisher": "Houghton Mifflin",
        "language": "eng",
        "format": "Paperback",
        "year": "1937",
        "pages": "300-399",
        "avg_rating": "4.0-4.5",
        "shelf": "fantasy",
    }
    assert (items[102]["author"], items[102]["pages"], items[102]["avg_rating"], items[102]["shelf"]) == (
        "",
        "",
        "",
        "",
    )
    assert (items[103]["author"], items[103]["pages"], items[103]["avg_rating"], items[103]["shelf"]) == (
        "999",
        "<100",
        "4.5-5.0",
        "classics",
    )
    assert (items[104]["pages"], items[104]["avg_rating"], items[104]["year"]) == ("1000+", "3.0-3.5", "2001")

    # Global order is by UTC time: line 2 (15:00 UTC) comes before line 1 (13:00 local = 20:00 UTC).
    p = prepare(data, GOODREADS, min_history=0, kcore=0, split=(0.5, 0.25, 0.25), few_shot_size=2, seed=0)
    assert p.timestamp_g.tolist() == [1470009600, 1470063600, 1470081600, 1470108600, 1470218400, 1470225600]
    assert p.label_g.tolist() == [0, 1, 1, 0, 0, 1]  # ratings 2, 4, 5, 3, 1, 5
    assert p.users.column("user_key").to_pylist() == [U1, U2]
    assert p.hist_len_g.tolist() == [0, 1, 0, 1, 2, 2]


def test_json_hand_checked_prepare_and_date_updated(tmp_path):
    raw = make_hand_dir(tmp_path)
    result = run(raw, tmp_path, split=(0.5, 0.25, 0.25))
    assert_accounting(result)
    assert result.metadata["counts"]["raw_rows"] == 7
    assert result.metadata["drops"]["unrated_shelf"]["count"] == 1
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pylist()
    hobbit = next(r for r in items if r["item"] == 101)
    assert hobbit["description"] == (
        "Here is a book. Its title is The Hobbit. The book's author is J.R.R. Tolkien. Its genre is fantasy."
    )

    # date_updated orders the rows when asked for.
    rows = [dict(r, date_updated="Fri Jan 01 00:00:00 +0000 2010") for r in HAND_ROWS]
    rows[0]["date_updated"] = "Fri Jan 01 00:00:00 -0100 2010"  # 01:00 UTC = 1262307600
    write_jsonl_gz(raw / INTER, rows)
    drops = DropLog()
    data = read_goodreads(raw, drops, DropLog(), 100, GoodreadsOptions(timestamp_field="date_updated"))
    assert data.interactions.timestamp.tolist() == [1262307600] + [1262304000] * 5


def test_dates_match_python_strptime():
    values = [
        "Mon Aug 01 13:41:57 -0700 2016",
        "Mon Aug 01 13:41:57 +0530 2016",
        "Tue Jan 01 00:00:00 +0000 2013",
        "Thu Jan 01 05:00:00 +0500 1970",
        "Fri Dec 31 23:59:59 -1200 2010",
        "Sat Feb 29 12:00:00 +1400 2020",
    ]
    rng = random.Random(0)
    for _ in range(300):  # random valid dates, any offset inside +-24 h, years 1900..2099
        when = datetime(1900, 1, 1) + timedelta(seconds=rng.randrange(200 * 365 * 86400))
        offset = f"{rng.choice('+-')}{rng.randrange(24):02d}{rng.randrange(60):02d}"
        values.append(when.strftime(f"%a %b %d %H:%M:%S {offset} %Y"))
    secs, ok = parse_goodreads_dates(pa.array(values))
    assert ok.all()
    assert secs.tolist() == [int(datetime.strptime(v, DATE_FORMAT).timestamp()) for v in values]
    python_rejects = [
        "Mon Aug 01 13:41:57 2016",  # no offset
        "Mon Feb 30 10:00:00 +0000 2015",  # no such day
        "Sun Feb 29 10:00:00 +0000 2015",  # not a leap year
        "Mon Aug 01 24:00:00 +0000 2016",
        "Mon Aug 01 13:41:61 +0000 2016",
        "Mon Aug 01 13:41:57 -2400 2016",
        "Xyz Aug 01 13:41:57 -0700 2016",
        "Mon Foo 01 13:41:57 -0700 2016",
        "2016-08-01T13:41:57-07:00",
        "",
    ]
    for value in python_rejects:
        with pytest.raises(ValueError):
            datetime.strptime(value, DATE_FORMAT)
    # Stricter than Python on purpose: GoodReads always writes 2-digit days and capitalised names.
    stricter = ["Mon Aug 1 13:41:57 -0700 2016", "mon aug 01 13:41:57 -0700 2016"]
    bad = [*python_rejects, *stricter, None]
    assert not parse_goodreads_dates(pa.array(bad, pa.string()))[1].any()


# ----------------------------------------------------------------------------------------------------------
# Malformed inputs: each case is an error naming file (and line) and reason, or a counted drop.


@dataclass
class Case:
    name: str
    setup: Callable[[Path], Path]  # tmp root -> raw dir
    error: list[str] = field(default_factory=list)  # substrings of the RawDataError message
    drop: tuple[str, int, str] | None = None  # (reason, count, first example location)
    meta_drop: tuple[str, int, str] | None = None
    cfg: dict = field(default_factory=dict)


def with_rows(*extra) -> Callable[[Path], Path]:
    """BASE_ROWS (lines 1..12) then the given extra lines (13, 14, ...), with BASE_BOOKS."""
    return lambda root: make_json_dir(root, [*BASE_ROWS, *extra])


def good(book_id="101", rating=4, date="Sat Jan 30 10:00:00 -0800 2016", user=U1, **extra) -> dict:
    """A valid interaction after every base row (an unused date): change one value to break it."""
    return interaction(user, book_id, rating, date, **extra)


def drop_case(name, reason, *extra, count=1, line=13, **cfg) -> Case:
    return Case(name, with_rows(*extra), drop=(reason, count, f"{INTER}:{line}"), cfg=cfg)


def _truncated(root: Path) -> Path:
    raw = make_json_dir(root, BASE_ROWS * 50)
    data = (raw / INTER).read_bytes()
    (raw / INTER).write_bytes(data[: len(data) // 2])
    return raw


def _not_gzip(root: Path) -> Path:
    raw = make_json_dir(root, BASE_ROWS)
    (raw / INTER).write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in BASE_ROWS))
    return raw


def _empty_file(root: Path) -> Path:
    raw = make_json_dir(root, BASE_ROWS)
    (raw / INTER).write_bytes(b"")
    return raw


def _empty_folder(root: Path) -> Path:
    (root / "raw").mkdir()
    return root / "raw"


def _no_books(root: Path) -> Path:
    raw = make_json_dir(root, BASE_ROWS)
    (raw / BOOKS).unlink()
    return raw


def _renamed_key(root: Path) -> Path:
    rows = [{("userId" if k == "user_id" else k): v for k, v in r.items()} for r in BASE_ROWS]
    return make_json_dir(root, rows)


def _books_truncated(root: Path) -> Path:
    raw = make_json_dir(root, BASE_ROWS, BASE_BOOKS * 40)
    data = (raw / BOOKS).read_bytes()
    (raw / BOOKS).write_bytes(data[: len(data) - 20])
    return raw


def _csv(text: str | bytes) -> Callable[[Path], Path]:
    """A csv with the header (line 1), 12 good rows (lines 2..13), then ``text`` from line 14."""

    def setup(root: Path) -> Path:
        raw = root / "raw"
        raw.mkdir()
        good_rows = "".join(f"{k % 3},{100 + k % 4},1,{1 + k % 5},0\n" for k in range(12))
        body = text if isinstance(text, bytes) else text.encode()
        (raw / "goodreads_interactions.csv").write_bytes(
            b"user_id,book_id,is_read,rating,is_reviewed\n" + good_rows.encode() + body
        )
        return raw

    return setup


def _csv_raw(text: str) -> Callable[[Path], Path]:
    def setup(root: Path) -> Path:
        raw = root / "raw"
        raw.mkdir()
        (raw / "goodreads_interactions.csv").write_text(text)
        return raw

    return setup


CSV = "goodreads_interactions.csv"

CASES = [
    # --- structural problems of the json files: RawDataError naming the file (and line)
    Case("not_json_line", with_rows("this is not json"), error=[f"{INTER}:13", "not valid JSON"]),
    Case("json_array_line", with_rows("[1, 2, 3]"), error=[f"{INTER}:13", "not a JSON object"]),
    Case(
        "two_objects_one_line",
        with_rows(json.dumps(good()) + " " + json.dumps(good())),
        error=[f"{INTER}:13", "not valid JSON", "Extra data"],
    ),
    Case(
        "non_utf8_bytes",
        with_rows(json.dumps(good(review_text_incomplete="cafe")).encode().replace(b"cafe", b"caf\xe9")),
        error=[f"{INTER}:13", "not valid UTF-8", "0xe9"],
    ),
    Case("truncated_gzip", _truncated, error=[INTER, "truncated or corrupt gzip"]),
    Case("not_gzip_bytes", _not_gzip, error=[INTER, "truncated or corrupt gzip"]),
    Case("empty_file", _empty_file, error=[INTER, "file is empty"]),
    Case("only_blank_lines", lambda root: make_json_dir(root, ["", "  "]), error=[INTER, "no data rows"]),
    Case("empty_folder", _empty_folder, error=["raw", "no GoodReads interaction files", "empty folder"]),
    Case("missing_books_file", _no_books, error=["raw", "goodreads_books*.json.gz", INTER]),
    Case("renamed_key", _renamed_key, error=[f"{INTER}:1", "key 'user_id' missing", "userId"]),
    Case(
        "timestamp_field_absent",
        lambda root: make_json_dir(
            root, [{k: v for k, v in r.items() if k != "date_updated"} for r in BASE_ROWS]
        ),
        error=[f"{INTER}:1", "key 'date_updated' missing"],
        cfg={"goodreads": GoodreadsOptions(timestamp_field="date_updated")},
    ),
    Case(
        "no_usable_row",  # ISO dates everywhere: the wrong layout, not 12 rows to drop
        lambda root: make_json_dir(
            root, [dict(r, date_added="2016-01-01T10:00:00-08:00") for r in BASE_ROWS]
        ),
        error=[INTER, "none of its 12 data rows is usable", "timestamp_invalid 12 (first at line 1)"],
    ),
    Case(
        "csv_no_usable_row",
        _csv_raw("user_id,book_id,is_read,rating,is_reviewed\n0,1,1,0,0\n0,2,1,0,0\n0,3\n"),
        error=[
            CSV,
            "none of its 3 data rows is usable",
            "unrated_shelf 2 (first at line 2)",
            "malformed_line 1",
        ],
    ),
    Case("books_truncated_gzip", _books_truncated, error=[BOOKS, "truncated or corrupt gzip"]),
    Case(
        "books_not_json_line",
        lambda root: make_json_dir(root, BASE_ROWS, [*BASE_BOOKS, "{not json"]),
        error=[f"{BOOKS}:5", "not valid JSON"],
    ),
    # --- row problems of the json files: counted drops with their first location
    drop_case("missing_rating_key", "rating_missing", {k: v for k, v in good().items() if k != "rating"}),
    drop_case("missing_user_key", "user_id_invalid", {k: v for k, v in good().items() if k != "user_id"}),
    drop_case("null_rating", "rating_missing", good(rating=None)),
    drop_case("nan_rating", "rating_missing", json.dumps(good(rating=float("nan")))),
    drop_case("empty_string_rating", "rating_missing", good(rating="")),
    drop_case("text_rating", "rating_invalid", good(rating="great")),
    drop_case("bool_rating", "rating_invalid", good(rating=True)),
    drop_case("rating_too_high", "rating_out_of_range", good(rating=6)),
    drop_case("negative_rating", "rating_out_of_range", good(rating=-1)),
    drop_case("fractional_rating", "rating_out_of_range", good(rating=4.5)),
    drop_case("rating_zero", "unrated_shelf", good(rating=0), good(rating=0), count=2),
    drop_case("date_without_offset", "timestamp_invalid", good(date="Sat Jan 30 10:00:00 2016")),
    drop_case("unparsable_date", "timestamp_invalid", good(date="yesterday")),
    drop_case("empty_date", "timestamp_invalid", good(date="")),
    drop_case("impossible_date", "timestamp_invalid", good(date="Mon Feb 30 10:00:00 +0000 2015")),
    drop_case(
        "huge_negative_timestamp", "timestamp_out_of_range", good(date="Mon Jan 01 00:00:00 +0000 0001")
    ),
    drop_case("date_after_2100", "timestamp_out_of_range", good(date="Fri Jan 01 00:00:00 +0000 2155")),
    drop_case("user_not_hex", "user_id_invalid", good(user="not-a-hash")),
    drop_case("empty_user", "user_id_invalid", good(user="")),
    drop_case("book_id_not_digits", "item_id_invalid", good(book_id="B00X")),
    drop_case("empty_book_id", "item_id_invalid", good(book_id="")),
    drop_case("book_not_in_books", "unknown_item", good(book_id="999")),
    drop_case("duplicated_row", "duplicate_row", BASE_ROWS[0], line=13),
    drop_case("blank_lines_keep_line_numbers", "unrated_shelf", "", "   ", good(rating=0), line=15),
    Case(
        "user_with_too_little_history",
        with_rows(good(user=U1.replace("8", "9"))),
        drop=("history_only", 4, f"{INTER}:1"),  # min_history=1: each user's first row (3 base users + 1)
        cfg={"min_history": 1},
    ),
    Case(
        "duplicated_book",
        lambda root: make_json_dir(root, BASE_ROWS, [*BASE_BOOKS, book("102", title="again")]),
        meta_drop=("duplicate_id", 1, f"{BOOKS}:5"),
    ),
    # --- strict mode: the first drop becomes a RawDataError naming file:line
    Case(
        "strict_rating_out_of_range",
        with_rows(good(rating=6)),
        error=[f"{INTER}:13", "outside the dataset's scale", "strict mode"],
        cfg={"strict": True},
    ),
    Case(
        "strict_bad_date",
        with_rows(good(), good(date="soon")),
        error=[f"{INTER}:14", "timestamp cannot be parsed", "strict mode"],
        cfg={"strict": True},
    ),
    Case(
        "strict_unknown_item",
        with_rows(good(book_id="999")),
        error=[f"{INTER}:13", "not in the item metadata", "strict mode"],
        cfg={"strict": True},
    ),
    # --- the csv variant
    Case(
        "csv_wrong_delimiter",
        _csv_raw("user_id;book_id;is_read;rating;is_reviewed\n0;1;1;5;0\n"),
        error=[f"{CSV}:1", "wrong delimiter"],
    ),
    Case(
        "csv_renamed_column",
        _csv_raw("user,book_id,is_read,rating,is_reviewed\n0,1,1,5,0\n"),
        error=[f"{CSV}:1", "missing ['user_id']"],
    ),
    Case(
        "csv_missing_column",
        _csv_raw("user_id,book_id,rating\n0,1,5\n"),
        error=[f"{CSV}:1", "missing ['is_read', 'is_reviewed']"],
    ),
    Case("csv_empty_file", _csv_raw(""), error=[CSV, "file is empty"]),
    Case(
        "csv_header_only",
        _csv_raw("user_id,book_id,is_read,rating,is_reviewed\n"),
        error=[CSV, "no data rows"],
    ),
    Case(
        "csv_non_utf8",
        _csv(b"0,101,1,4,0\n1,10\xff2,1,4,0\n"),
        error=[f"{CSV}:15", "not valid utf-8", "0xff"],
    ),
    Case("csv_short_line", _csv("0,101,1\n"), drop=("malformed_line", 1, f"{CSV}:14")),
    Case("csv_empty_rating", _csv("0,101,1,,0\n"), drop=("rating_missing", 1, f"{CSV}:14")),
    Case("csv_nan_rating", _csv("0,101,1,NaN,0\n"), drop=("rating_missing", 1, f"{CSV}:14")),
    Case("csv_text_rating", _csv("0,101,1,five,0\n"), drop=("rating_invalid", 1, f"{CSV}:14")),
    Case(
        "csv_rating_out_of_range",
        _csv("0,101,1,7,0\n0,102,1,3.5,0\n"),
        drop=("rating_out_of_range", 2, f"{CSV}:14"),
    ),
    Case("csv_negative_user", _csv("-1,101,1,4,0\n"), drop=("user_id_invalid", 1, f"{CSV}:14")),
    Case(
        "csv_huge_book_id", _csv("0,99999999999999999999,1,4,0\n"), drop=("item_id_invalid", 1, f"{CSV}:14")
    ),
    Case("csv_rating_zero", _csv("\n0,101,1,0,0\n"), drop=("unrated_shelf", 1, f"{CSV}:15")),
    Case("csv_strict", _csv("0,101,1,,0\n"), error=[f"{CSV}:14", "strict mode"], cfg={"strict": True}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_input(case: Case, tmp_path):
    raw = case.setup(tmp_path)
    if case.error:
        with pytest.raises(RawDataError) as info:
            run(raw, tmp_path, **case.cfg)
        message = str(info.value)
        for part in case.error:
            assert part in message, f"{part!r} not in {message!r}"
        return
    result = run(raw, tmp_path, **case.cfg)
    assert_accounting(result)
    meta = result.metadata
    for expected, got in ((case.drop, meta["drops"]), (case.meta_drop, meta["metadata_drops"])):
        if expected is None:
            continue
        reason, count, location = expected
        assert got[reason]["count"] == count, got
        assert got[reason]["examples"][0] == location
    if case.drop is not None and case.drop[0] != "history_only":
        # Exactly one problem per case: nothing else was dropped (the history filter is off).
        assert set(meta["drops"]) == {case.drop[0]}


U_NEW = "d" * 32


def test_accepted_variants(tmp_path):
    """Numeric-string and integral-float ratings, JSON-integer book ids and a BOM are accepted."""
    first = json.dumps(BASE_ROWS[0])
    rows = [
        "\ufeff" + first,
        *BASE_ROWS[1:],
        good(rating="4", user=U_NEW),  # a user of its own: (U1, 101) again would be a re-rating
        good(rating=4.0, book_id="102", user=U_NEW),
        good(book_id=103, user=U_NEW),
    ]
    raw = make_json_dir(tmp_path, rows)
    result = run(raw, tmp_path)
    assert result.metadata["drops"] == {}
    assert result.metadata["counts"]["samples"] == 15


def test_several_interaction_files_and_csv_maps(tmp_path):
    # Two per-genre files: file index = position in sorted order, drop examples name the right file.
    raw = tmp_path / "raw"
    raw.mkdir()
    write_jsonl_gz(raw / "goodreads_interactions_poetry.json.gz", BASE_ROWS[:6])
    write_jsonl_gz(raw / "goodreads_interactions_children.json.gz", [*BASE_ROWS[6:], good(rating=0)])
    write_jsonl_gz(raw / "goodreads_books_poetry.json.gz", BASE_BOOKS)
    drops = DropLog()
    data = read_goodreads(raw, drops, DropLog(), 4, GoodreadsOptions())
    assert data.file_names == [
        "goodreads_interactions_children.json.gz",
        "goodreads_interactions_poetry.json.gz",
    ]
    assert drops.examples["unrated_shelf"] == ["goodreads_interactions_children.json.gz:7"]
    assert data.raw_rows == 13
    assert data.interactions.file.tolist() == [0] * 6 + [1] * 6

    # csv ids map to json ids through book_id_map.csv / user_id_map.csv when both are present.
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "goodreads_interactions.csv").write_text(
        "user_id,book_id,is_read,rating,is_reviewed\n1,0,1,5,0\n0,1,1,3,0\n1,2,1,4,0\n0,9,1,4,0\n7,0,1,4,0\n"
    )
    (csv_dir / "book_id_map.csv").write_text("book_id_csv,book_id\n0,101\n1,102\n2,103\n0,555\n")
    (csv_dir / "user_id_map.csv").write_text(f"user_id_csv,user_id\n0,{U1}\n1,{U2.upper()}\n")
    write_jsonl_gz(csv_dir / BOOKS, HAND_BOOKS)
    drops, meta_drops = DropLog(), DropLog()
    data = read_goodreads(csv_dir, drops, meta_drops, 100, GoodreadsOptions())
    assert drops.counts == {"unknown_item": 1, "unknown_user": 1}
    assert drops.examples == {"unknown_item": [f"{CSV}:5"], "unknown_user": [f"{CSV}:6"]}
    assert meta_drops.examples["duplicate_id"] == ["book_id_map.csv:5", f"{BOOKS}:6"]
    assert data.interactions.item.tolist() == [101, 102, 103]  # csv book 0 -> 101: the first mapping wins
    # user_progress: user 0's rows (lines 2, 4) are its 0/2 and 1/2, user 1's row (line 3) its 0/1
    assert data.interactions.timestamp.tolist() == [0, 0, 5 * 10**8]
    in_file_order = read_goodreads(csv_dir, DropLog(), DropLog(), 100, GoodreadsOptions(csv_order="file"))
    assert in_file_order.interactions.timestamp.tolist() == [2, 3, 4]  # the line number stands in for time
    assert data.interactions.user.tolist() == [0, 1, 0]  # codes in order of first appearance, as for json
    assert data.user_keys == [U2, U1]
    titles = dict(zip(data.items.column("item").to_pylist(), data.items.column("title").to_pylist()))
    assert titles == {101: "The Hobbit", 102: "Untitled", 103: "Poems"}
    assert [p.name for p in data.files] == [CSV, "book_id_map.csv", "user_id_map.csv", BOOKS]

    # Books next to the csv but no book_id_map.csv: the ids cannot be joined, metadata stays empty.
    (csv_dir / "book_id_map.csv").unlink()
    data = read_goodreads(csv_dir, DropLog(), DropLog(), 100, GoodreadsOptions())
    assert data.items.column("item").to_pylist() == [0, 1, 2, 9]
    assert set(data.items.column("title").to_pylist()) == {""}

"""Class 7: values that are not valid are dropped and counted (or rejected under ``strict``): re-rated
(user, item) pairs (the latest rating is kept), ML-1M user codes outside the README's lists, text in the
wrong encoding, a book without a title, a rating off the half-star grid. Each case checks the count against
what the test wrote (an independent count), and the row accounting raw rows = samples + drops."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from reclora_ds.data.processed import ProcessedDataset
from tests.bad_input.corpus import (
    GENRES,
    N_ITEMS,
    metadata,
    prepare_args,
    ratings_rows,
    run_cli,
    write_goodreads,
    write_ml1m,
    write_ml25m,
)

pytestmark = pytest.mark.slow  # each case runs prepare (about a second)


def _prepare(capsys, raw, out, *extra, dataset="ml-25m"):
    result = run_cli(capsys, *prepare_args(raw, out, *extra, dataset=dataset))
    assert result.code == 0, result.err
    m = metadata(out)
    assert m["accounting"]["raw_rows"] == m["accounting"]["samples"] + m["accounting"]["dropped"]
    return m


def _rerated_rows():
    rows = ratings_rows()
    u, i, _, t = rows[0]
    # user 1 rates their first item again, twice, later (different timestamps): the last (2.0) is kept
    return rows + [(u, i, 4.5, t + 500_000_000), (u, i, 2.0, t + 600_000_000)]


def test_rerated_pair_keeps_the_latest_rating_and_counts_the_others(capsys, tmp_path):
    raw = write_ml25m(tmp_path / "raw", _rerated_rows())
    m = _prepare(capsys, raw, tmp_path / "out", "min_history=0")
    assert m["drops"]["rerated_pair"]["count"] == 2
    assert m["drops"]["rerated_pair"]["examples"][0].startswith("ratings.csv:")
    ds = ProcessedDataset(tmp_path / "out")
    t = pq.read_table(tmp_path / "out" / "timelines.parquet").to_pandas()
    users = ds.users.to_pandas()
    items = ds.items.to_pandas()
    u_index = int(users.loc[users["user"] == 1, "user_index"].iloc[0])
    i_index = int(items.loc[items["item"] == _rerated_rows()[0][1], "item_index"].iloc[0])
    pair = t[(t.user_index == u_index) & (t.item_index == i_index)]
    assert len(pair) == 1 and float(pair.rating.iloc[0]) == 2.0
    # no history holds the same (user, item) twice
    assert not t.duplicated(["user_index", "item_index"]).any()


def test_strict_rejects_a_rerated_pair_naming_the_file_and_line(capsys, tmp_path):
    raw = write_ml25m(tmp_path / "raw", _rerated_rows())
    n = len(ratings_rows())
    run_cli(capsys, *prepare_args(raw, tmp_path / "out", "strict=true")).assert_user_error(
        "ratings.csv:", "rated the same item again later", "strict"
    )
    assert not (tmp_path / "out").exists()
    assert n > 0


@pytest.mark.parametrize(
    "bad_user, field",
    [("1::X::25::3::02139", "gender"), ("1::M::7::3::02139", "age"), ("1::F::25::99::02139", "occupation")],
    ids=["gender-X", "age-7", "occupation-99"],
)
def test_ml1m_user_with_an_invalid_code_is_dropped_with_their_ratings(capsys, tmp_path, bad_user, field):
    users = [bad_user] + [f"{u}::{'MF'[u % 2]}::25::{u % 21}::0{u:04d}" for u in range(2, 13)]
    raw = write_ml1m(tmp_path / "raw", users=users)
    m = _prepare(capsys, raw, tmp_path / "out", "min_history=3", dataset="ml-1m")
    assert m["metadata_drops"]["user_field_invalid"]["count"] == 1
    assert m["metadata_drops"]["user_field_invalid"]["examples"] == ["users.dat:1"]
    per_user = sum(1 for r in ratings_rows() if r[0] == 1)
    assert m["drops"]["unknown_user"]["count"] == per_user
    users_out = ProcessedDataset(tmp_path / "out").users.to_pandas()
    assert 1 not in set(users_out["user"]) and not ({"X"} & set(users_out["gender"]))


def test_ml1m_invalid_user_code_under_strict_is_an_error(capsys, tmp_path):
    users = ["1::M::7::3::02139"] + [f"{u}::M::25::1::0{u:04d}" for u in range(2, 13)]
    raw = write_ml1m(tmp_path / "raw", users=users)
    run_cli(capsys, *prepare_args(raw, tmp_path / "out", "strict=true", dataset="ml-1m")).assert_user_error(
        "users.dat:1", "documented codes"
    )


def test_windows_1252_movies_dat_is_detected_with_file_and_line(capsys, tmp_path):
    text = "".join(f"{i}::Movie {i} (1999)::{GENRES[i % 4]}\n" for i in range(1, N_ITEMS + 1))
    text = text.replace("5::Movie 5", "5::Movie \u2019s 5")  # a curly apostrophe: 0x92 in Windows-1252
    raw = write_ml1m(tmp_path / "raw", movies_bytes=text.encode("cp1252"))
    run_cli(capsys, *prepare_args(raw, tmp_path / "out", dataset="ml-1m")).assert_user_error(
        "movies.dat:5", "control character U+0092", "Windows-1252"
    )


def test_control_character_in_movies_csv_is_detected(capsys, tmp_path):
    movies = [f"{i},Movie {i},Drama" for i in range(1, N_ITEMS + 1)]
    movies[2] = "3,Movie\x073,Drama"
    raw = write_ml25m(tmp_path / "raw", movies=movies)
    run_cli(capsys, *prepare_args(raw, tmp_path / "out")).assert_user_error("movies.csv:4", "U+0007")


def test_movie_without_a_title_is_dropped_and_counted(capsys, tmp_path):
    movies = [f"{i},Movie {i},Drama" for i in range(1, N_ITEMS + 1)]
    movies[0] = '1,"",Drama'
    raw = write_ml25m(tmp_path / "raw", movies=movies)
    m = _prepare(capsys, raw, tmp_path / "out", "min_history=3")
    assert m["metadata_drops"]["title_missing"]["count"] == 1
    assert m["drops"]["unknown_item"]["count"] == sum(1 for r in ratings_rows() if r[1] == 1)
    assert "" not in set(ProcessedDataset(tmp_path / "out").items.column("title").to_pylist())


def test_goodreads_book_without_a_title_is_dropped_and_counted(capsys, tmp_path):
    books = [{"book_id": str(i), "title": f"Book {i}" if i != 4 else "  "} for i in range(1, N_ITEMS + 1)]
    raw = write_goodreads(tmp_path / "gr", books=books)
    m = _prepare(capsys, raw, tmp_path / "out", "min_history=3", dataset="goodreads")
    assert m["metadata_drops"]["title_missing"]["count"] == 1
    assert m["drops"]["unknown_item"]["count"] == sum(1 for r in ratings_rows() if r[1] == 4)


@pytest.mark.parametrize("value", ["3.0000004", "3.0000000001", "2.75", "5.5", "0.0"])
def test_rating_off_the_half_star_grid_is_dropped(capsys, tmp_path, value):
    rows = ratings_rows()
    u, i, _, t = rows[5]
    rows[5] = f"{u},{i},{value},{t}"
    raw = write_ml25m(tmp_path / "raw", rows)
    m = _prepare(capsys, raw, tmp_path / "out", "min_history=3")
    assert m["drops"]["rating_out_of_range"] == {
        "count": 1,
        "why": m["drops"]["rating_out_of_range"]["why"],
        "examples": ["ratings.csv:7"],
    }


def test_exact_half_star_ratings_all_pass(capsys, tmp_path):
    rows = [(u, i, 0.5 + (k % 10) * 0.5, t) for k, (u, i, _, t) in enumerate(ratings_rows())]
    raw = write_ml25m(tmp_path / "raw", rows)
    m = _prepare(capsys, raw, tmp_path / "out", "min_history=3")
    assert "rating_out_of_range" not in m["drops"]


def test_rating_grid_check_against_exact_decimal_arithmetic():
    """Independent reference: Python's Decimal on the text, not floats."""
    from decimal import Decimal

    import numpy as np

    from reclora_ds.data.specs import ML_25M

    texts = ["0.5", "3.0000004", "4.5", "4.50000000001", "5.0", "5.5", "1e0", "2.499999999"]
    expected = [Decimal(x) * 2 == int(Decimal(x) * 2) and Decimal("0.5") <= Decimal(x) <= 5 for x in texts]
    got = ML_25M.rating_valid(np.array([float(x) for x in texts]))
    assert got.tolist() == expected

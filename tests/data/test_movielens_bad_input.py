"""Malformed MovieLens input, case by case, on small copies of real data.

Every case starts from a slice of real files (the bundled ml-latest-small for the ML-25M layout, the ML-1M
sample for the ML-1M layout), applies one corruption and runs ``prepare_dataset``. It expects either a
:class:`RawDataError` naming the file, the line and the reason, or a counted drop with its reason, count and
``file:line`` example, with exact accounting: raw rows = the non-blank data lines written = samples + drops.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from reclora_ds.data.config import PrepareConfig
from reclora_ds.data.errors import RawDataError
from reclora_ds.data.prepare import bundled_dataset, prepare_dataset
from reclora_ds.data.processed import ProcessedDataset
from reclora_ds.data.raw.delimited import parse_float, parse_int

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ML25M_SRC = bundled_dataset("ml-latest-small")
ML1M_SRC = FIXTURES / "ml-1m-sample"
N_RATINGS = 300  # data lines kept from the real ratings file

# name -> lines (bytes, without line breaks); whole files that are not split into lines are one entry.
Files = dict[str, list[bytes]]


@dataclass(frozen=True)
class Layout:
    dataset: str
    ratings: str
    delimiter: bytes
    header: bool  # ratings file has a header line
    files: tuple[str, ...]

    def base(self) -> Files:
        src = ML25M_SRC if self.dataset == "ml-25m" else ML1M_SRC
        out = {n: (src / n).read_bytes().split(b"\n") for n in self.files}
        for lines in out.values():
            if lines and lines[-1] == b"":
                lines.pop()
        out[self.ratings] = out[self.ratings][: N_RATINGS + int(self.header)]
        return out

    def line(self, data_row: int) -> int:
        """File line of the ``data_row``-th (1-based) data row of the unmodified ratings slice."""
        return data_row + int(self.header)


ML25M = Layout("ml-25m", "ratings.csv", b",", True, ("ratings.csv", "movies.csv"))
ML1M = Layout("ml-1m", "ratings.dat", b"::", False, ("ratings.dat", "users.dat", "movies.dat"))


def write(files: Files, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (folder / name).write_bytes(b"".join(x + b"\n" for x in lines))
    return folder


def data_lines(path: Path, header: bool) -> int:
    """Non-blank lines of a written file (the header excluded): what ``raw_rows`` must be."""
    text = path.read_bytes().decode("latin-1").replace("\r\n", "\n")
    return sum(1 for x in text.split("\n") if x.strip()) - int(header)


def run(layout: Layout, raw_dir: Path, out: Path, **overrides):
    cfg = dict(
        dataset=layout.dataset,
        raw_dir=str(raw_dir),
        output_dir=str(out),
        few_shot_size=50,
        min_history=5,
        shards_per_split=1,
    )
    return prepare_dataset(PrepareConfig(**(cfg | overrides)))


# ---- corruptions ------------------------------------------------------------------------------------


def set_field(name: str, line: int, index: int, value: bytes, delimiter: bytes):
    def corrupt(f: Files) -> None:
        parts = f[name][line - 1].split(delimiter)
        parts[index] = value
        f[name][line - 1] = delimiter.join(parts)

    return corrupt


def set_line(name: str, line: int, value: bytes):
    def corrupt(f: Files) -> None:
        f[name][line - 1] = value

    return corrupt


def insert_line(name: str, line: int, value: bytes | Callable[[Files], bytes]):
    def corrupt(f: Files) -> None:
        f[name].insert(line - 1, value(f) if callable(value) else value)

    return corrupt


def every_line(name: str, fn: Callable[[bytes], bytes]):
    def corrupt(f: Files) -> None:
        f[name] = [fn(x) for x in f[name]]

    return corrupt


def whole(name: str, content: bytes):
    def corrupt(f: Files) -> None:
        f[name] = [content] if content else []

    return corrupt


def remove(*names: str):
    def corrupt(f: Files) -> None:
        for n in names:
            del f[n]

    return corrupt


def chain(*fns):
    def corrupt(f: Files) -> None:
        for fn in fns:
            fn(f)

    return corrupt


def replace_in(name: str, old: bytes, new: bytes, count: int = 1):
    def corrupt(f: Files) -> None:
        hits = 0
        for i, x in enumerate(f[name]):
            if old in x and hits < count:
                f[name][i] = x.replace(old, new)
                hits += 1
        assert hits == count, f"{old!r} found {hits} times in {name}"

    return corrupt


# ---- expectations -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Error:
    file: str
    line: int | None
    words: tuple[str, ...]


@dataclass(frozen=True)
class Drop:
    reason: str
    count: int
    line: int | None  # a line of ``file`` listed among the examples
    file: str = ""  # defaults to the ratings file
    section: str = "drops"  # or "metadata_drops"
    also: tuple[str, ...] = ()  # other reasons allowed besides history_only


@dataclass(frozen=True)
class Clean:
    """Loads without any drop besides history_only (then ``Case.check`` looks at the result)."""


@dataclass(frozen=True)
class Same(Clean):
    """Loads exactly like the unmodified slice: counts, drops with their examples, splits."""


@dataclass(frozen=True)
class Case:
    id: str
    corrupt: Callable[[Files], None]
    expect: Error | Drop | Clean
    options: dict = field(default_factory=dict)
    check: Callable[[Path, object], None] | None = None

    def param(self):
        return pytest.param(self, id=self.id)


def _titles(out: Path) -> dict[int, str]:
    items = ProcessedDataset(out).items
    return dict(zip(items.column("item").to_pylist(), items.column("title").to_pylist()))


def _user_rows(layout: Layout, user: bytes) -> list[int]:
    lines = layout.base()[layout.ratings]
    return [i + 1 for i, x in enumerate(lines) if x.split(layout.delimiter)[0] == user]


# ---- ML-25M layout cases ----------------------------------------------------------------------------

R25 = "ratings.csv"
L25 = ML25M.line(10)  # a data line in the middle of user 1's rows (file line 11)
FAKE_HISTORY_25 = [b"9999,1,4.0,800000001", b"9999,2,4.0,800000002", b"9999,3,4.0,800000003"]


def _fld25(index, value):
    return set_field(R25, L25, index, value, b",")


def _check_quoted_titles(out: Path, result) -> None:
    titles = _titles(out)
    assert titles[999001] == 'Odd, "Quoted" Title, The (2001)'
    assert titles[50] == "Usual Suspects, The (1995)"  # a real quoted title with a comma


ML25M_CASES = [
    # whole-file problems
    Case(
        "semicolon_delimiter",
        every_line(R25, lambda x: x.replace(b",", b";")),
        Error(R25, 1, ("header", "wrong delimiter")),
    ),
    Case(
        "tab_delimiter",
        every_line(R25, lambda x: x.replace(b",", b"\t")),
        Error(R25, 1, ("header", "wrong delimiter")),
    ),
    Case(
        "data_lines_with_other_delimiter",
        lambda f: f.update({R25: f[R25][:1] + [x.replace(b",", b";") for x in f[R25][1:]]}),
        Error(R25, 2, ("expected 4 fields", "wrong delimiter")),
    ),
    Case(
        "missing_column",
        every_line(R25, lambda x: x.rsplit(b",", 1)[0]),
        Error(R25, 1, ("header", "missing ['timestamp']")),
    ),
    Case(
        "renamed_column",
        replace_in(R25, b"userId", b"user_id"),
        Error(R25, 1, ("header", "missing ['userId']", "unexpected ['user_id']")),
    ),
    Case(
        "extra_column",
        every_line(R25, lambda x: x + (b",tag" if x.startswith(b"userId") else b",x")),
        Error(R25, 1, ("header", "unexpected ['tag']")),
    ),
    Case(
        "non_utf8_rating_line",
        set_line(R25, 57, b"1,2,4.0,96498\xff2703"),
        Error(R25, 57, ("not valid utf-8", "0xff")),
    ),
    Case("empty_ratings_file", whole(R25, b""), Error(R25, None, ("file is empty",))),
    Case("header_only", lambda f: f.update({R25: f[R25][:1]}), Error(R25, None, ("no data rows",))),
    Case(
        "timestamps_in_milliseconds",
        lambda f: f.update({R25: f[R25][:1] + [x + b"000" for x in f[R25][1:]]}),
        Error(
            R25, None, ("none of its 300 data rows is usable", "timestamp_out_of_range 300 (first at line 2)")
        ),
    ),
    Case("blank_first_line", insert_line(R25, 1, b"   "), Error(R25, 1, ("line 1 is blank", "header"))),
    Case(
        "missing_movies_file",
        remove("movies.csv"),
        Error("raw", None, ("missing movies.csv", "MovieLens-25M")),
    ),
    Case(
        "missing_both_files",
        remove("movies.csv", R25),
        Error("raw", None, ("missing ratings.csv, movies.csv", "MovieLens-25M")),
    ),
    Case(
        "movies_non_utf8",
        set_line("movies.csv", 3, b"2,Jum\xe9nji (1995),Adventure|Children|Fantasy"),
        Error("movies.csv", 3, ("not valid utf-8", "0xe9")),
    ),
    Case(
        "movies_renamed_column",
        replace_in("movies.csv", b"genres", b"genre"),
        Error("movies.csv", 1, ("header", "missing ['genres']")),
    ),
    Case(
        "strict_rating_abc",
        _fld25(2, b"abc"),
        Error(R25, L25, ("not a number", "strict mode")),
        {"strict": True},
    ),
    Case(
        "strict_duplicate_movie",
        replace_in("movies.csv", b"2,Jumanji (1995)", b"1,Jumanji (1995)"),
        Error("movies.csv", 3, ("earlier line of the metadata file", "strict mode")),
        {"strict": True},
    ),
    # row problems: counted drops
    Case("rating_nan", _fld25(2, b"NaN"), Drop("rating_missing", 1, L25)),
    Case("rating_empty", _fld25(2, b""), Drop("rating_missing", 1, L25)),
    Case("rating_abc", _fld25(2, b"abc"), Drop("rating_invalid", 1, L25)),
    Case("rating_inf", _fld25(2, b"inf"), Drop("rating_invalid", 1, L25)),
    Case(
        "rating_inf_next_to_abc",  # same reason whichever parsing path the batch takes
        chain(_fld25(2, b"inf"), set_field(R25, 40, 2, b"abc", b",")),
        Drop("rating_invalid", 2, L25),
    ),
    *[
        Case(f"rating_{v.decode()}", _fld25(2, v), Drop("rating_out_of_range", 1, L25))
        for v in (b"0", b"5.5", b"6", b"-1", b"3.3")
    ],
    Case("timestamp_text", _fld25(3, b"2000-07-30"), Drop("timestamp_invalid", 1, L25)),
    Case("timestamp_float", _fld25(3, b"964982703.5"), Drop("timestamp_invalid", 1, L25)),
    Case("timestamp_beyond_int64", _fld25(3, b"99999999999999999999"), Drop("timestamp_invalid", 1, L25)),
    Case("timestamp_negative", _fld25(3, b"-964982703"), Drop("timestamp_out_of_range", 1, L25)),
    Case("timestamp_year_2200", _fld25(3, b"7258118400"), Drop("timestamp_out_of_range", 1, L25)),
    Case("user_id_float", _fld25(0, b"1.5"), Drop("user_id_invalid", 1, L25)),
    Case("user_id_text", _fld25(0, b"u1"), Drop("user_id_invalid", 1, L25)),
    Case("user_id_beyond_int64", _fld25(0, b"99999999999999999999"), Drop("user_id_invalid", 1, L25)),
    Case("user_id_with_plus_sign", _fld25(0, b"+1"), Same()),
    Case("item_id_empty", _fld25(1, b""), Drop("item_id_invalid", 1, L25)),
    Case(
        "duplicated_row",
        insert_line(R25, L25 + 1, lambda f: f[R25][L25 - 1]),
        Drop("duplicate_row", 1, L25 + 1),
    ),
    Case("unknown_movie", _fld25(1, b"999999"), Drop("unknown_item", 1, L25)),
    Case(
        "user_with_too_little_history",
        lambda f: f[R25].extend(FAKE_HISTORY_25),
        Drop("history_only", 5 * 3 + 3, ML25M.line(N_RATINGS) + 1),
    ),
    Case("too_few_fields_mid_file", set_line(R25, 150, b"1,1,4.0"), Drop("malformed_line", 1, 150)),
    Case(
        "too_many_fields_mid_file", set_line(R25, 150, b"1,1,4.0,964982224,x"), Drop("malformed_line", 1, 150)
    ),
    Case(
        "blank_lines_mid_file_keep_line_numbers",
        chain(insert_line(R25, 5, b""), insert_line(R25, 6, b" \t "), set_field(R25, 41, 2, b"abc", b",")),
        Drop("rating_invalid", 1, 41),
    ),
    Case("trailing_blank_lines", lambda f: f[R25].extend([b"", b"  ", b"", b"\t"]), Same()),
    Case("crlf_line_endings", every_line(R25, lambda x: x + b"\r"), Same()),
    Case("bom", lambda f: f[R25].__setitem__(0, b"\xef\xbb\xbf" + f[R25][0]), Same()),
    # movies.csv problems
    Case(
        "movies_duplicated_movie_id",
        replace_in("movies.csv", b"2,Jumanji (1995)", b"1,Jumanji (1995)"),
        Drop("duplicate_id", 1, 3, file="movies.csv", section="metadata_drops"),
        check=lambda out, r: _titles(out)[1] == "Toy Story (1995)",  # the first one is kept
    ),
    Case(
        "movies_blank_lines_keep_line_numbers",
        chain(
            insert_line("movies.csv", 2, b""),
            insert_line("movies.csv", 4, b"   "),
            replace_in("movies.csv", b"5,Father of the Bride", b"1,Father of the Bride"),
        ),
        Drop("duplicate_id", 1, 8, file="movies.csv", section="metadata_drops"),
    ),
    Case(
        "movies_extra_field",
        replace_in("movies.csv", b"3,Grumpier Old Men (1995),", b"3,Grumpier Old Men (1995),x,"),
        Drop("malformed_line", 1, 4, file="movies.csv", section="metadata_drops"),
        check=lambda out, r: r.metadata["drops"]["unknown_item"]["count"] == 1,  # user 1 rated movie 3
    ),
    Case(
        "movies_missing_genres",
        replace_in("movies.csv", b"3,Grumpier Old Men (1995),Comedy|Romance", b"3,Grumpier Old Men (1995)"),
        Drop("malformed_line", 1, 4, file="movies.csv", section="metadata_drops"),
    ),
    Case(
        "movies_unbalanced_quote",
        replace_in("movies.csv", b'50,"Usual Suspects, The (1995)"', b'50,"Usual Suspects, The (1995)'),
        Drop("malformed_line", 1, 48, file="movies.csv", section="metadata_drops", also=("unknown_item",)),
    ),
    Case(
        "movies_title_with_commas_and_quotes",
        chain(
            lambda f: f["movies.csv"].append(b'999001,"Odd, ""Quoted"" Title, The (2001)",Comedy|Drama'),
            set_field(R25, L25, 1, b"999001", b","),
        ),
        Clean(),
        check=_check_quoted_titles,
    ),
    Case(
        "movies_crlf_and_bom",
        chain(
            every_line("movies.csv", lambda x: x + b"\r"),
            lambda f: f["movies.csv"].__setitem__(0, b"\xef\xbb\xbf" + f["movies.csv"][0]),
        ),
        Same(),
    ),
]

# ---- ML-1M layout cases -----------------------------------------------------------------------------

R1 = "ratings.dat"
L1 = 11
USER4_ROWS = _user_rows(ML1M, b"4")
FAKE_HISTORY_1 = [b"6::1::4::900000001", b"6::2::4::900000002"]  # user 6 is in users.dat


def _fld1(index, value):
    return set_field(R1, L1, index, value, b"::")


def _check_accents(out: Path, result) -> None:
    titles = _titles(out)
    assert titles[1873] == "Misérables, Les (1998)"  # ISO-8859-1 0xe9
    assert titles[3799] == "Pokémon the Movie 2000 (2000)"


ML1M_CASES = [
    Case(
        "semicolon_delimiter",
        every_line(R1, lambda x: x.replace(b"::", b";")),
        Error(R1, 1, ("expected 4 fields", "found 1", "wrong delimiter")),
    ),
    Case(
        "tab_delimiter",
        every_line(R1, lambda x: x.replace(b"::", b"\t")),
        Error(R1, 1, ("expected 4 fields", "found 1", "wrong delimiter")),
    ),
    Case(
        "missing_column",
        every_line(R1, lambda x: x.rsplit(b"::", 1)[0]),
        Error(R1, 1, ("expected 4 fields", "found 3")),
    ),
    Case(
        "extra_column", every_line(R1, lambda x: x + b"::x"), Error(R1, 1, ("expected 4 fields", "found 5"))
    ),
    Case(
        "users_extra_column",
        every_line("users.dat", lambda x: x + b"::x"),
        Error("users.dat", 1, ("expected 5 fields", "found 6")),
    ),
    Case(
        "header_line_added",  # .dat files have no header: it is a row with a bad user id
        insert_line(R1, 1, b"UserID::MovieID::Rating::Timestamp"),
        Drop("user_id_invalid", 1, 1),
    ),
    Case(
        "non_utf8_rating_line",
        set_line(R1, 57, b"1::2::4\xe9::978300760"),
        Error(R1, 57, ("not valid utf-8", "0xe9")),
    ),
    Case("empty_ratings_file", whole(R1, b""), Error(R1, None, ("file is empty",))),
    Case("only_blank_lines", whole(R1, b"\n  \n"), Error(R1, None, ("no data rows",))),
    Case(
        "quoted_fields",
        every_line(R1, lambda x: b"::".join(b'"' + v + b'"' for v in x.split(b"::"))),
        Error(R1, None, ("none of its 300 data rows is usable", "user_id_invalid 300 (first at line 1)")),
    ),
    Case(
        "missing_users_and_movies",
        remove("users.dat", "movies.dat"),
        Error("raw", None, ("missing users.dat, movies.dat", "MovieLens-1M")),
    ),
    Case(
        "strict_rating_3_5",
        _fld1(2, b"3.5"),
        Error(R1, L1, ("outside the dataset's scale", "strict mode")),
        {"strict": True},
    ),
    Case("rating_nan", _fld1(2, b"nan"), Drop("rating_missing", 1, L1)),
    Case("rating_empty", _fld1(2, b""), Drop("rating_missing", 1, L1)),
    Case("rating_abc", _fld1(2, b"abc"), Drop("rating_invalid", 1, L1)),
    *[
        Case(f"rating_{v.decode()}", _fld1(2, v), Drop("rating_out_of_range", 1, L1))
        for v in (b"0", b"6", b"-1", b"3.5", b"4.5")
    ],
    Case("timestamp_text", _fld1(3, b"yesterday"), Drop("timestamp_invalid", 1, L1)),
    Case("timestamp_negative", _fld1(3, b"-1"), Drop("timestamp_out_of_range", 1, L1)),
    Case("timestamp_year_2200", _fld1(3, b"7258118400"), Drop("timestamp_out_of_range", 1, L1)),
    Case("user_id_text", _fld1(0, b"one"), Drop("user_id_invalid", 1, L1)),
    Case("item_id_empty", _fld1(1, b""), Drop("item_id_invalid", 1, L1)),
    Case("item_id_beyond_int64", _fld1(1, b"123456789012345678901"), Drop("item_id_invalid", 1, L1)),
    Case(
        "duplicated_row", insert_line(R1, L1 + 1, lambda f: f[R1][L1 - 1]), Drop("duplicate_row", 1, L1 + 1)
    ),
    Case("unknown_movie", _fld1(1, b"999999"), Drop("unknown_item", 1, L1)),
    Case("unknown_user", _fld1(0, b"77777"), Drop("unknown_user", 1, L1)),
    Case(
        "user_missing_from_users_dat",
        lambda f: f.update({"users.dat": [x for x in f["users.dat"] if not x.startswith(b"4::")]}),
        Drop("unknown_user", len(USER4_ROWS), USER4_ROWS[0]),
    ),
    Case(
        "user_with_too_little_history",
        lambda f: f[R1].extend(FAKE_HISTORY_1),
        Drop("history_only", 5 * 5 + 2, N_RATINGS + 1),
        {"min_history": 5},
    ),
    Case("too_few_fields_mid_file", set_line(R1, 150, b"2::1::4"), Drop("malformed_line", 1, 150)),
    Case("single_colon_mid_file", set_line(R1, 150, b"2:1:4:978300760"), Drop("malformed_line", 1, 150)),
    Case("trailing_blank_lines", lambda f: f[R1].extend([b"", b"", b"   "]), Same()),
    Case(
        "crlf_line_endings_all_files",
        chain(*(every_line(n, lambda x: x + b"\r") for n in ML1M.files)),
        Same(),
        check=_check_accents,
    ),
    Case("bom_ratings", lambda f: f[R1].__setitem__(0, b"\xef\xbb\xbf" + f[R1][0]), Same()),
    Case("bom_users", lambda f: f["users.dat"].__setitem__(0, b"\xef\xbb\xbf" + f["users.dat"][0]), Same()),
    Case(
        "movies_dat_iso_8859_1_with_bom",
        lambda f: f["movies.dat"].__setitem__(0, b"\xef\xbb\xbf" + f["movies.dat"][0]),
        Same(),
        check=_check_accents,
    ),
    Case(
        "movies_dat_resaved_as_utf8_with_bom",
        lambda f: f.update(
            {
                "movies.dat": [
                    (b"\xef\xbb\xbf" if i == 0 else b"") + x.decode("latin-1").encode()
                    for i, x in enumerate(f["movies.dat"])
                ]
            }
        ),
        Same(),
        check=_check_accents,
    ),
    Case(
        "movies_duplicated_movie_id",
        replace_in("movies.dat", b"2::Jumanji (1995)", b"1::Jumanji (1995)"),
        Drop("duplicate_id", 1, 2, file="movies.dat", section="metadata_drops"),
    ),
    Case(
        "movies_bad_movie_id",
        replace_in("movies.dat", b"2::Jumanji (1995)", b"2a::Jumanji (1995)"),
        Drop("item_id_invalid", 1, 2, file="movies.dat", section="metadata_drops"),
    ),
    Case(
        "users_duplicated_user_id",
        replace_in("users.dat", b"3::M::25::15::55117", b"2::M::25::15::55117"),
        Drop("duplicate_id", 1, 3, file="users.dat", section="metadata_drops", also=("unknown_user",)),
    ),
    Case(
        "strict_malformed_users_line",
        replace_in("users.dat", b"3::M::25::15::55117", b"3::M::25::15"),
        Error("users.dat", 3, ("expected number of fields", "strict mode")),
        {"strict": True},
    ),
]


# ---- the runner -------------------------------------------------------------------------------------

_BASELINES: dict[str, object] = {}


def baseline(layout: Layout, tmp_path_factory) -> object:
    if layout.dataset not in _BASELINES:
        root = tmp_path_factory.mktemp(f"baseline-{layout.dataset}")
        _BASELINES[layout.dataset] = run(layout, write(layout.base(), root / "raw"), root / "out")
    return _BASELINES[layout.dataset]


def fingerprint(result) -> dict:
    m = result.metadata
    return {k: m[k] for k in ("counts", "accounting", "drops", "metadata_drops", "splits")}


def check_case(layout: Layout, case: Case, tmp_path: Path, tmp_path_factory) -> None:
    files = layout.base()
    case.corrupt(files)
    raw_dir = write(files, tmp_path / "raw")
    out = tmp_path / "out"
    expect = case.expect
    if isinstance(expect, Error):
        with pytest.raises(RawDataError) as info:
            run(layout, raw_dir, out, **case.options)
        msg = str(info.value)
        where = expect.file if expect.line is None else f"{expect.file}:{expect.line}"
        assert where in msg, msg
        assert info.value.line == expect.line, msg
        for word in expect.words:
            assert word in msg, f"{word!r} not in {msg!r}"
        return

    result = run(layout, raw_dir, out, **case.options)
    m = result.metadata
    acc = m["accounting"]
    assert acc["raw_rows"] == acc["samples"] + acc["dropped"]
    assert acc["raw_rows"] == m["counts"]["raw_rows"] == data_lines(raw_dir / layout.ratings, layout.header)
    assert acc["dropped"] == sum(d["count"] for d in m["drops"].values())
    if isinstance(expect, Clean):
        assert set(m["drops"]) <= {"history_only"} and m["metadata_drops"] == {}
        if isinstance(expect, Same):
            assert fingerprint(result) == fingerprint(baseline(layout, tmp_path_factory))
    else:
        section = m[expect.section]
        assert expect.reason in section, section
        assert section[expect.reason]["count"] == expect.count
        file = expect.file or layout.ratings
        if expect.line is not None:
            assert f"{file}:{expect.line}" in section[expect.reason]["examples"], section[expect.reason]
        allowed = {expect.reason, "history_only", *expect.also}
        if expect.section == "metadata_drops":
            allowed |= {"unknown_item", "unknown_user"}  # rows pointing at the dropped metadata row
            assert set(m["metadata_drops"]) == {expect.reason}
        else:
            assert m["metadata_drops"] == {}
        assert set(m["drops"]) <= allowed, m["drops"]
    if case.check is not None:
        assert case.check(out, result) is not False


@pytest.mark.parametrize("case", [c.param() for c in ML25M_CASES])
def test_ml25m_bad_input(case, tmp_path, tmp_path_factory):
    check_case(ML25M, case, tmp_path, tmp_path_factory)


@pytest.mark.parametrize("case", [c.param() for c in ML1M_CASES])
def test_ml1m_bad_input(case, tmp_path, tmp_path_factory):
    check_case(ML1M, case, tmp_path, tmp_path_factory)


def test_corpus_is_large_enough():
    assert len(ML25M_CASES) >= 20 and len(ML1M_CASES) >= 20
    assert len({c.id for c in ML25M_CASES}) == len(ML25M_CASES)
    assert len({c.id for c in ML1M_CASES}) == len(ML1M_CASES)


@pytest.mark.parametrize("layout", [ML25M, ML1M], ids=["ml-25m", "ml-1m"])
def test_raw_dir_that_does_not_exist(layout, tmp_path):
    with pytest.raises(RawDataError) as info:
        run(layout, tmp_path / "nowhere", tmp_path / "out")
    assert "nowhere" in str(info.value) and "raw data folder not found" in str(info.value)
    for name in layout.files:
        assert name in str(info.value)


@pytest.mark.parametrize("layout", [ML25M, ML1M], ids=["ml-25m", "ml-1m"])
def test_crlf_gives_identical_samples(layout, tmp_path):
    """Not just the same counts: the same sample rows, byte for byte."""
    lf = run(layout, write(layout.base(), tmp_path / "lf"), tmp_path / "out-lf")
    files = layout.base()
    for name in files:
        files[name] = [x + b"\r" for x in files[name]]
    crlf = run(layout, write(files, tmp_path / "crlf"), tmp_path / "out-crlf")
    for split in ("train", "valid", "test", "fewshot"):
        a = ProcessedDataset(lf.output_dir).read_split(split)
        b = ProcessedDataset(crlf.output_dir).read_split(split)
        assert a.equals(b)
    assert ProcessedDataset(lf.output_dir).items.equals(ProcessedDataset(crlf.output_dir).items)


# ---- parsing helpers that the cases go through -----------------------------------------------------


def test_parse_int_does_not_depend_on_the_rest_of_the_batch():
    values = ["+5", " 7 ", "-3", "9223372036854775807", "0012"]
    clean, ok = parse_int(pa.array(values))
    mixed, ok_mixed = parse_int(pa.array([*values, "x", "9223372036854775808", ""]))
    assert ok.all() and clean.tolist() == [5, 7, -3, 9223372036854775807, 12]
    assert mixed[:5].tolist() == clean.tolist() and ok_mixed.tolist() == [True] * 5 + [False] * 3


def test_parse_float_does_not_depend_on_the_rest_of_the_batch():
    values = ["4.0", "+3.5", ".5", "inf", "-inf", "nan"]  # Arrow's cast takes all of these
    for extra in ([], ["", "abc", " 4"]):  # these send the batch down the regex path
        v, ok, missing = parse_float(pa.array(values + extra))
        assert ok.tolist()[:6] == [True, True, True, False, False, False]
        assert missing.tolist()[:6] == [False] * 5 + [True]
        assert v[:3].tolist() == [4.0, 3.5, 0.5]
    v, ok, missing = parse_float(pa.array(["", "abc", " 4"]))
    assert ok.tolist() == [False, False, True] and missing.tolist() == [True, False, False] and v[2] == 4.0


# ---- properties on the real data --------------------------------------------------------------------


def _raw_ratings(path: Path, layout: Layout) -> dict[tuple[int, int, int], float]:
    if layout.header:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
    else:
        with open(path, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("::") for line in f if line.strip()]
    out = {(int(u), int(i), int(t)): float(r) for u, i, r, t in rows}
    assert len(out) == len(rows)  # (user, item, timestamp) identifies a real row
    return out


@pytest.mark.parametrize(
    ("name", "layout", "positive"),
    [("ml_small", ML25M, lambda r: r > 3.0), ("ml1m", ML1M, lambda r: r >= 4)],
    ids=["ml-25m", "ml-1m"],
)
def test_labels_follow_the_dataset_threshold_row_by_row(name, layout, positive, request):
    result = request.getfixturevalue(f"{name}_prepared")
    src = ML25M_SRC if layout is ML25M else ML1M_SRC
    raw = _raw_ratings(src / layout.ratings, layout)
    ds = ProcessedDataset(result.output_dir)
    users = ds.users.column("user").to_numpy()
    items = ds.items.column("item").to_numpy()
    seen = 0
    for split in ("train", "valid", "test"):
        t = ds.read_split(split)
        u = users[t.column("user_index").to_numpy()]
        i = items[t.column("item_index").to_numpy()]
        for user, item, ts, rating, label in zip(
            u.tolist(),
            i.tolist(),
            t.column("timestamp").to_pylist(),
            t.column("rating").to_pylist(),
            t.column("label").to_pylist(),
        ):
            expected = raw[(user, item, ts)]
            assert rating == pytest.approx(expected)
            assert label == int(positive(expected)), (user, item, ts, expected)
        seen += t.num_rows
    assert seen == result.metadata["counts"]["samples"]
    labels = np.concatenate([ds.read_split(s).column("label").to_numpy() for s in ("train", "valid", "test")])
    assert 0 < labels.mean() < 1


def test_ml1m_slice_follows_table1_arithmetic(ml1m_prepared):
    m = ml1m_prepared.metadata
    assert m["config"]["min_history"] == 5
    assert m["counts"]["raw_rows"] == 12_976 and m["counts"]["users"] == 100
    assert m["counts"]["samples"] == 12_976 - 5 * 100
    assert m["drops"]["history_only"]["count"] == 5 * 100 and set(m["drops"]) == {"history_only"}
    assert m["metadata_drops"] == {}

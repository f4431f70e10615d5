"""Shared helpers of the bad-input corpus: tiny raw datasets written per test, and a runner of the real
entry points (``reclora_ds.cli.main``, in-process) that returns the exit status and what was printed.

Every dataset here is small enough that ``prepare`` takes about a second; most cases fail before reading.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from reclora_ds import cli

N_USERS, N_ITEMS, PER_USER = 12, 20, 12  # 144 ratings; min_history=5 leaves 84 samples
GENRES = ("Action", "Comedy", "Drama", "Horror")


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    def assert_user_error(self, *fragments: str) -> None:
        """Exit 2, ``error:`` lines only, no traceback, and every fragment in the message."""
        assert self.code == 2, (self.code, self.err)
        assert "Traceback" not in self.err, self.err
        lines = [line.strip() for line in re.split(r"[\r\n]+", self.err) if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert errors and lines[-1].startswith("error: "), self.err  # progress bars may come before
        for fragment in fragments:
            assert fragment in self.err, (fragment, self.err)


def run_cli(capsys, *argv: str) -> Outcome:
    """``reclora-ds ARGV`` in this process (commands too: ``run_cli(capsys, "train_sim", ...)``)."""
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Outcome(code, captured.out, captured.err)


def sha256_tree(folder: Path) -> dict[str, str]:
    """Relative name -> sha256 of every file under ``folder`` (to prove nothing was touched)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def ratings_rows() -> list[tuple[int, int, float, int]]:
    """(user, item, rating, timestamp): every user rates PER_USER distinct items, one per day."""
    rows = []
    for u in range(1, N_USERS + 1):
        for k in range(PER_USER):
            item = (u * 7 + k * 3) % N_ITEMS + 1
            rating = 0.5 + ((u + k) % 10) * 0.5
            rows.append((u, item, rating, 1_000_000_000 + u * 10 + k * 86_400))
    return rows


def write_ml25m(folder: Path, rows: list[tuple] | None = None, movies: list[str] | None = None) -> Path:
    """An ML-25M-layout folder (ratings.csv, movies.csv); ``rows`` may hold raw text lines too."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ratings_rows() if rows is None else rows
    lines = ["userId,movieId,rating,timestamp"]
    lines += [r if isinstance(r, str) else f"{r[0]},{r[1]},{r[2]},{r[3]}" for r in rows]
    (folder / "ratings.csv").write_text("\n".join(lines) + "\n")
    if movies is None:
        movies = [f"{i},Movie {i} ({1990 + i}),{GENRES[i % 4]}|Drama" for i in range(1, N_ITEMS + 1)]
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "\n".join(movies) + "\n")
    return folder


def write_ml1m(
    folder: Path,
    users: list[str] | None = None,
    movies_bytes: bytes | None = None,
    rows: list[tuple] | None = None,
) -> Path:
    """An ML-1M-layout folder (ratings.dat, users.dat, movies.dat in ISO-8859-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(u, i, max(1, int(r)), t) for u, i, r, t in ratings_rows()] if rows is None else rows
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    if users is None:
        users = [
            f"{u}::{'MF'[u % 2]}::{(1, 18, 25, 35)[u % 4]}::{u % 21}::0{u:04d}" for u in range(1, N_USERS + 1)
        ]
    (folder / "users.dat").write_text("\n".join(users) + "\n")
    if movies_bytes is None:
        movies_bytes = "".join(
            f"{i}::Movie {i} ({1990 + i})::{GENRES[i % 4]}\n" for i in range(1, N_ITEMS + 1)
        ).encode("iso-8859-1")
    (folder / "movies.dat").write_bytes(movies_bytes)
    return folder


GOODREADS_DATE = "Mon Aug 01 13:41:57 -0700 2016"


def goodreads_user(u: int) -> str:
    return f"{u:032x}"


def write_goodreads(folder: Path, books: list[dict] | None = None, interactions: list | None = None) -> Path:
    """A GoodReads json layout: goodreads_interactions_x.json.gz + goodreads_books_x.json.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    if interactions is None:
        interactions = []
        for u, i, r, t in ratings_rows():
            day = 1 + (t - 1_000_000_000) // 86_400 % 28
            interactions.append(
                {
                    "user_id": goodreads_user(u),
                    "book_id": str(i),
                    "rating": max(1, int(r)),
                    "date_added": f"Mon Aug {day:02d} 13:41:{u % 60:02d} -0700 2016",
                }
            )
    if books is None:
        books = [{"book_id": str(i), "title": f"Book {i}", "authors": []} for i in range(1, N_ITEMS + 1)]
    with gzip.open(folder / "goodreads_interactions_x.json.gz", "wt") as f:
        f.write("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in interactions))
    with gzip.open(folder / "goodreads_books_x.json.gz", "wt") as f:
        f.write("".join(json.dumps(b) + "\n" for b in books))
    return folder


def prepare_args(raw: Path, out: Path, *extra: str, dataset: str = "ml-25m") -> list[str]:
    return [
        "prepare",
        f"dataset={dataset}",
        f"raw_dir={raw}",
        f"output_dir={out}",
        "few_shot_size=10",
        "shards_per_split=2",
        *extra,
    ]


def metadata(out: Path) -> dict:
    return json.loads((out / "metadata.json").read_text())

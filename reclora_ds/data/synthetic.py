"""SYNTHETIC raw data in the MovieLens-25M layout, for benchmarks and tests. Not real ratings.

:func:`write_synthetic_ml25m` writes a folder that the ``ml-25m`` reader accepts unchanged: ``ratings.csv``
(``userId,movieId,rating,timestamp``) and ``movies.csv`` (``movieId,title,genres``), with ML-25M's size by
default (25,000,095 ratings, 162,541 users, 59,047 rated movies; movies.csv also lists 3,376 unrated
ones, 62,423 in all, as the real file does). Every value is made up; only the shapes follow the real data:

- users: ids 1..U, each with at least 20 ratings; the number above 20 is Lomax (power-law) distributed,
  capped at 60% of the movies that exist while the user is active. The file is ordered by user, then by
  movieId, like the real one.
- movies: sparse ids that grow with the date a movie was added (gaps of 1-5, ids up to ~209k at full size);
  30% exist from the start, the rest are added over 1995-2019 at a growing rate. Popularity is Zipf-like
  (weight ``(rank + 250) ** -2`` over a random rank; each user's movies are a weighted sample without
  replacement): at full size the top movie has ~80k ratings and the item Gini is ~0.92 (ML-25M: 81,491
  and 0.94); every rated movie gets at least one rating. Titles look like ``Movie 123 (1999)``, some
  with commas (``"Movie 123, The (1999)"``, quoted) or quotes; genres are drawn from the real 20 with their
  ML-25M frequencies, ``|``-separated in alphabetical order (``(no genres listed)`` alone).
- timestamps: 1995-01-09 .. 2019-11-21 (ML-25M's range); each user joins in a year drawn from a
  MovieLens-like sign-up curve and is active for a span (one session for many light users, up to years for
  heavy ones) split into sessions; a rating never comes before its movie was added; ties happen.
- ratings: half stars ``0.5``..``5.0`` written like the real file (``4.0``, ``3.5``) with ML-25M's share of
  each level (mean about 3.5, 62.5% above 3.0), driven by a user bias + movie quality + noise; before
  2003-02-18 only whole stars (MovieLens added half stars then).
- no (user, movie) pair occurs twice (ML-25M has none).

Output depends only on the :class:`SyntheticConfig` (seed included), and the writing is chunked by users,
so memory stays bounded (about 0.5 GB at full size) and 25M rows take well under two minutes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from reclora_ds.config import STAGE_CONFIG_FILE
from reclora_ds.files import atomic_dir, listing_problems, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

ML25M_RATINGS = 25_000_095
ML25M_USERS = 162_541
ML25M_MOVIES = 59_047  # movies with at least one rating
ML25M_UNRATED_MOVIES = 3_376  # movies.csv lists 62,423 movies in all
MIN_USER_RATINGS = 20  # "each user has rated at least 20 movies" (ML-25M README)

FIRST_TIMESTAMP = 789_652_009  # 1995-01-09 11:46:49 UTC, ML-25M's first rating
LAST_TIMESTAMP = 1_574_327_703  # 2019-11-21 09:15:03 UTC, its last
HALF_STARS_FROM = 1_045_526_400  # 2003-02-18 UTC; whole stars only before
YEAR_SECONDS = 31_556_952

RATING_LEVELS = ("0.5", "1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0", "4.5", "5.0")
# ML-25M's count of each level (sums to 25,000,095; mean 3.534)
RATING_COUNTS = (
    393_068,
    776_815,
    399_490,
    1_640_868,
    1_262_797,
    4_896_928,
    3_177_318,
    6_639_798,
    2_200_539,
    3_612_474,
)
# The 20 ML-25M genres and how many of its 62,423 movies list each.
GENRE_COUNTS = {
    "Action": 7_348,
    "Adventure": 4_145,
    "Animation": 2_929,
    "Children": 2_935,
    "Comedy": 16_870,
    "Crime": 5_319,
    "Documentary": 5_605,
    "Drama": 25_606,
    "Fantasy": 2_731,
    "Film-Noir": 353,
    "Horror": 5_989,
    "IMAX": 195,
    "Musical": 1_054,
    "Mystery": 2_925,
    "Romance": 7_719,
    "Sci-Fi": 3_595,
    "Thriller": 8_654,
    "War": 1_874,
    "Western": 1_399,
}
NO_GENRE = "(no genres listed)"
NO_GENRE_SHARE = 5_062 / 62_423
# Relative number of new users per sign-up year 1995..2019 (a rough MovieLens-like curve).
SIGNUP_YEAR_WEIGHTS = (2, 8, 6, 4, 5, 8, 4, 3, 4, 4, 5, 4, 3, 3, 3, 3, 3, 3, 3, 4, 8, 9, 6, 5, 4)

USER_PARETO_SHAPE = 1.8  # Lomax shape of ratings above the minimum: median/mean like ML-25M (51/134)
ITEM_ZIPF_EXPONENT = 2.0  # with the offset: top movie ~80k ratings, item Gini ~0.92 (ML-25M: 81,491, 0.94)
ITEM_ZIPF_OFFSET = 250.0
USER_CAP_FRACTION = 0.6  # a user rates at most this share of the movies available to them
INITIAL_CATALOG_SHARE = 0.3  # movies that exist before the first rating
RATINGS_HEADER = "userId,movieId,rating,timestamp"
MOVIES_HEADER = ["movieId", "title", "genres"]
MANIFEST = "synthetic.json"
DATA_FILES = ("ratings.csv", "movies.csv")
GENERATOR_VERSION = 1  # bump when the output for a given config changes (invalidates reused folders)
SAMPLING_ROUNDS = 8  # vectorised draw-and-reject rounds before the per-user fallback


@dataclass(frozen=True)
class SyntheticConfig:
    """What a synthetic dataset is; equal configs give byte-identical files.

    Attributes:
        rows: rating rows (ML-25M: 25,000,095).
        users: users, ids 1..users; each gets at least ``min_user_ratings`` rows.
        items: movies with at least one rating.
        unrated_items: further movies listed in movies.csv only; None = ML-25M's share (3,376 / 59,047).
        seed: seed of every random choice.
        min_user_ratings: least ratings per user (ML-25M: 20).
        chunk_rows: about this many rows are generated and written at a time (bounds memory); part of the
            identity of the output, as chunks draw from their own random streams.
    """

    rows: int = ML25M_RATINGS
    users: int = ML25M_USERS
    items: int = ML25M_MOVIES
    unrated_items: int | None = None
    seed: int = 0
    min_user_ratings: int = MIN_USER_RATINGS
    chunk_rows: int = 2_000_000

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 1:
            raise ValueError(f"users and items must be >= 1, got {self.users} and {self.items}")
        if self.rows < self.users * self.min_user_ratings:
            raise ValueError(
                f"rows ({self.rows:,}) < users x min_user_ratings ({self.users:,} x {self.min_user_ratings})"
            )
        if self.rows < self.items:
            raise ValueError(f"rows ({self.rows:,}) < items ({self.items:,}): every item needs a rating")
        if self.chunk_rows < 1000:
            raise ValueError(f"chunk_rows must be >= 1000, got {self.chunk_rows}")

    @property
    def n_unrated(self) -> int:
        if self.unrated_items is not None:
            return self.unrated_items
        return round(self.items * ML25M_UNRATED_MOVIES / ML25M_MOVIES)

    def key(self) -> str:
        """Short folder-name key of the config (``r25000095-u162541-i59047-s0``)."""
        return f"r{self.rows}-u{self.users}-i{self.items}-s{self.seed}"


def scaled_config(rows: int, seed: int = 0) -> SyntheticConfig:
    """ML-25M's shape at another size: users scale with rows, items with the square root of rows."""
    frac = rows / ML25M_RATINGS
    users = max(1, min(round(ML25M_USERS * frac), rows // MIN_USER_RATINGS))
    items = max(10, min(ML25M_MOVIES, round(ML25M_MOVIES * frac**0.5)))
    return SyntheticConfig(rows=rows, users=users, items=items, seed=seed)


@dataclass
class SyntheticResult:
    """What :func:`write_synthetic_ml25m` wrote."""

    raw_dir: Path
    config: SyntheticConfig
    ratings_bytes: int
    movies_rows: int
    seconds: float


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` summing exactly to ``total`` (largest remainders)."""
    if total <= 0 or len(weights) == 0:
        return np.zeros(len(weights), dtype=np.int64)
    exact = weights / weights.sum() * total
    out = np.floor(exact).astype(np.int64)
    short = int(total - out.sum())
    if short > 0:
        out[np.argpartition(-(exact - out), short - 1)[:short]] += 1
    return out


@dataclass
class _Catalog:
    """All movies in order of the date they were added (rated ones and listed-only ones)."""

    movie_id: np.ndarray  # int64, ascending
    added: np.ndarray  # int64 seconds
    rated: np.ndarray  # bool
    year: np.ndarray  # int, release year in the title


def _catalog(cfg: SyntheticConfig) -> _Catalog:
    rng = _rng(cfg.seed, 0, 0)
    n = cfg.items + cfg.n_unrated
    n_initial = round(n * INITIAL_CATALOG_SHARE)
    growth = 2.0  # additions per year grow ~e^2 over the 25 years
    u = rng.random(n - n_initial)
    later = FIRST_TIMESTAMP + (np.log1p(u * np.expm1(growth)) / growth) * (LAST_TIMESTAMP - FIRST_TIMESTAMP)
    added = np.sort(np.concatenate([np.full(n_initial, FIRST_TIMESTAMP - 1), later.astype(np.int64)]))
    mean_gap = np.linspace(1.5, 5.2, n)  # ids get sparser over time, like ML's (1..209,171 at full size)
    movie_id = np.cumsum(rng.geometric(1.0 / mean_gap)).astype(np.int64)
    # listed-only movies are mostly recent additions
    pos = np.arange(1, n + 1, dtype=np.float64)
    unrated_at = rng.choice(n, size=cfg.n_unrated, replace=False, p=pos**3 / (pos**3).sum())
    rated = np.ones(n, dtype=bool)
    rated[unrated_at] = False
    added_year = 1970 + added // YEAR_SECONDS
    old = rng.random(n) ** 0.5 * (1995 - 1915) + 1915  # the initial catalogue leans to recent films
    year = np.where(added < FIRST_TIMESTAMP, old.astype(np.int64), added_year - rng.integers(0, 3, n))
    return _Catalog(movie_id, added, rated, year)


def _genres(rng: np.random.Generator, n: int) -> list[str]:
    names = np.array(sorted(GENRE_COUNTS))
    share = np.array([GENRE_COUNTS[g] for g in names]) / 62_423
    picks = rng.random((n, len(names))) < share[None, :]
    none = rng.random(n) < NO_GENRE_SHARE
    picks[none] = False
    empty = ~picks.any(axis=1) & ~none
    picks[empty, rng.choice(len(names), size=int(empty.sum()), p=share / share.sum())] = True
    return [NO_GENRE if not row.any() else "|".join(names[row]) for row in picks]


def _titles(rng: np.random.Generator, movie_id: np.ndarray, year: np.ndarray) -> list[str]:
    kind = rng.random(len(movie_id))
    titles = []
    for mid, y, k in zip(movie_id.tolist(), year.tolist(), kind.tolist()):
        if k < 0.08:
            titles.append(f"Movie {mid}, The ({y})")
        elif k < 0.11:
            titles.append(f"Movie {mid}, A ({y})")
        elif k < 0.115:
            titles.append(f'Movie {mid} "Redux" ({y})')
        elif k < 0.13:
            titles.append(f"Movie {mid}: Part {mid % 7 + 2} ({y})")
        else:
            titles.append(f"Movie {mid} ({y})")
    return titles


@dataclass
class _Users:
    count: np.ndarray  # int64 [U] ratings per user
    start: np.ndarray  # int64 [U]
    end: np.ndarray  # int64 [U]
    available: np.ndarray  # int64 [U] rated movies added before the user's last activity
    added: np.ndarray  # int64 [I] when each rated movie was added, at most the last user activity
    bias: np.ndarray  # float [U]
    forced_user: np.ndarray  # int64 [I] the user that surely rates rated movie i


def _users(cfg: SyntheticConfig, added: np.ndarray) -> _Users:
    rng = _rng(cfg.seed, 0, 1)
    n = cfg.users
    # activity: min + Lomax extra; the spans depend on it (light users often rate in one sitting)
    weight = rng.pareto(USER_PARETO_SHAPE, n) + 1e-3
    years = np.arange(1995, 1995 + len(SIGNUP_YEAR_WEIGHTS))
    p_year = np.array(SIGNUP_YEAR_WEIGHTS, dtype=np.float64)
    year = rng.choice(years, size=n, p=p_year / p_year.sum())
    start = (year - 1970) * YEAR_SECONDS + rng.random(n) * YEAR_SECONDS
    start = np.clip(start, FIRST_TIMESTAMP, LAST_TIMESTAMP - 3600).astype(np.int64)
    rel = weight / np.median(weight)  # ~1 for a median user
    one_sitting = rng.random(n) < 0.5 / np.sqrt(np.maximum(rel, 1.0))
    long_span = np.exp(rng.uniform(np.log(86_400), np.log(15 * YEAR_SECONDS), n))
    span = np.where(one_sitting, rng.exponential(2 * 3600, n) + 600, long_span)
    end = np.minimum(start + span, LAST_TIMESTAMP).astype(np.int64)
    added = np.minimum(added, end.max())  # someone can rate every movie
    available = np.searchsorted(added, end, side="right")
    cap = np.maximum((available * USER_CAP_FRACTION).astype(np.int64), 0)
    if (cap < cfg.min_user_ratings).any() or cap.sum() < cfg.rows:
        raise ValueError(
            f"{cfg.items:,} items are too few for {cfg.rows:,} rows over {n:,} users without repeated pairs"
        )
    count = cfg.min_user_ratings + apportion(weight, cfg.rows - cfg.min_user_ratings * n)
    for _ in range(100):  # cap at a share of the available movies; give the excess to the others
        over = count > cap
        if not over.any():
            break
        excess = int((count[over] - cap[over]).sum())
        count[over] = cap[over]
        room = count < cap
        count[room] += apportion(weight[room], excess)
    else:
        raise RuntimeError("could not cap the user activity")

    # every rated movie: one rating from a user active after it was added, chosen by activity
    by_end = np.argsort(end, kind="stable")
    cum = np.cumsum(count[by_end].astype(np.float64))
    first = np.searchsorted(end[by_end], added, side="left")
    lo = np.where(first > 0, cum[np.maximum(first - 1, 0)], 0.0)
    pick = np.searchsorted(cum, lo + rng.random(len(added)) * (cum[-1] - lo), side="right")
    forced_user = by_end[np.minimum(pick, n - 1)]
    forced = np.bincount(forced_user, minlength=n)
    short = np.maximum(forced - count, 0)
    if short.any():  # a light user drew more forced movies than ratings: move rows from the heaviest
        count += short
        slack = np.maximum(count - np.maximum(forced, cfg.min_user_ratings), 0)
        count -= apportion(slack.astype(np.float64), int(short.sum()))
    bias = rng.normal(0.0, 0.45, n)
    return _Users(count, start, end, available, added, bias, forced_user)


def _sample_chunk(
    rng: np.random.Generator,
    count: np.ndarray,
    available: np.ndarray,
    forced_local: np.ndarray,
    forced_item: np.ndarray,
    popularity: np.ndarray,
    cum_pop: np.ndarray,
    rounds: int = SAMPLING_ROUNDS,
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (local user, item) pairs, ``count[u]`` per user, items < ``available[u]``, user-major sorted.

    Each user's items are a weighted sample without replacement (weights = ``popularity``, restricted to
    the items available to the user) on top of its forced items: a few vectorised rounds of draw-and-reject
    (exact: rejecting repeats = drawing from what is left), then Efraimidis-Spirakis keys for the few
    heavy users still short.
    """
    n_items = len(popularity)
    keys = np.sort(forced_local.astype(np.int64) * n_items + forced_item)
    have = np.bincount(forced_local, minlength=len(count))
    for _ in range(rounds):
        deficit = count - have
        if not deficit.any():
            break
        uu = np.repeat(np.arange(len(count), dtype=np.int64), deficit)
        avail = available[uu]
        r = rng.random(len(uu))
        item = np.minimum(np.searchsorted(cum_pop, r * cum_pop[avail - 1], side="right"), avail - 1)
        new = np.sort(uu * n_items + item)
        new = new[np.concatenate([[True], new[1:] != new[:-1]])]
        if len(keys):
            new = new[keys[np.minimum(np.searchsorted(keys, new), len(keys) - 1)] != new]
        keys = np.concatenate([keys, new])
        keys.sort(kind="stable")  # two sorted runs: timsort merges them in linear time
        have += np.bincount(new // n_items, minlength=len(count))
    short = np.flatnonzero(count > have)
    if len(short):
        lo = np.searchsorted(keys, short * n_items)
        hi = np.searchsorted(keys, (short + 1) * n_items)
        extra = []
        for u, a, b in zip(short.tolist(), lo.tolist(), hi.tolist()):
            avail = int(available[u])
            key = rng.exponential(size=avail) / popularity[:avail]  # smallest keys = weighted sample
            key[keys[a:b] % n_items] = np.inf
            need = int(count[u] - have[u])
            extra.append(u * n_items + np.argpartition(key, need - 1)[:need])
        keys = np.sort(np.concatenate([keys, *extra]))
    return keys // n_items, keys % n_items


def _timestamps(
    rng: np.random.Generator, user: np.ndarray, count: np.ndarray, start: np.ndarray, end: np.ndarray
) -> np.ndarray:
    """Per-row times: each user's span is cut into sessions; rows fall inside a random session."""
    span = (end - start).astype(np.float64)
    sessions = np.where(span > 86_400, 1 + rng.poisson(np.sqrt(count) / 2), 1)
    s_off = np.zeros(len(count) + 1, dtype=np.int64)
    np.cumsum(sessions, out=s_off[1:])
    s_user = np.repeat(np.arange(len(count)), sessions)
    anchor = start[s_user] + rng.random(len(s_user)) * span[s_user]
    anchor[s_off[:-1]] = start  # the first session opens the span
    length = np.where(sessions[s_user] == 1, span[s_user], rng.exponential(3600, len(s_user)) + 60)
    which = s_off[user] + (rng.random(len(user)) * sessions[user]).astype(np.int64)
    ts = anchor[which] + rng.random(len(user)) * length[which]
    return np.minimum(ts, end[user]).astype(np.int64)


def _level_shares(whole_only_share: float) -> tuple[np.ndarray, np.ndarray]:
    """Level shares (0.5..5.0) before and after half stars, mixing to ML-25M's overall shares.

    Before: ML-25M's shares with each half star's mass moved to whole neighbours without changing the
    label (3.5 -> 4.0, 0.5 -> 1.0, the others split evenly), so the positive rate does not drift in time.
    After: what makes ``whole_only_share`` x before + the rest x after equal the overall shares.
    """
    target = np.array(RATING_COUNTS, dtype=np.float64) / sum(RATING_COUNTS)
    before = np.zeros(10)
    for k, share in enumerate(target):
        if k % 2 == 1:  # odd index = whole stars
            before[k] += share
        elif RATING_LEVELS[k] in ("0.5", "3.5"):
            before[k + 1] += share
        else:
            before[k - 1] += share / 2
            before[k + 1] += share / 2
    f = min(whole_only_share, 0.999)
    after = np.clip((target - f * before) / (1 - f), 0.0, None)
    return before, after / after.sum()


def _ratings(score: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Level index 0..9 (0.5..5.0 stars) by quantiles of ``score``; whole stars only before 2003-02-18."""
    early = ts < HALF_STARS_FROM
    before, after = _level_shares(float(early.mean()))
    level = np.empty(len(score), dtype=np.int64)
    for mask, shares in ((early, before), (~early, after)):
        if mask.any():
            cuts = np.quantile(score[mask], np.cumsum(shares)[:-1])
            level[mask] = np.searchsorted(cuts, score[mask], side="right")
    return level


def _write_movies(path: Path, cfg: SyntheticConfig, cat: _Catalog) -> int:
    rng = _rng(cfg.seed, 0, 2)
    titles = _titles(rng, cat.movie_id, cat.year)
    genres = _genres(rng, len(cat.movie_id))
    with open(path, "w", newline="", encoding="utf-8") as f:  # inside the temporary output folder
        w = csv.writer(f, lineterminator="\n")  # quotes only titles with commas or quotes, like the real file
        w.writerow(MOVIES_HEADER)
        w.writerows(zip(cat.movie_id.tolist(), titles, genres))
    return len(titles)


class SyntheticFolderError(ValueError):
    """A folder is not a complete synthetic dataset: its ``synthetic.json`` and its files disagree (named)."""


def synthetic_problems(out_dir: str | Path) -> list[str]:
    """Why ``out_dir`` is not a complete, unchanged output of :func:`write_synthetic_ml25m` (empty: it is).

    Checked against ``synthetic.json``: its generator version, its ``files`` list (every file present with
    its size and, for ``movies.csv``, its sha256; ``ratings.csv`` by size and its row count, as hashing
    GBs on every reuse would cost as much as writing them again) and no other file in the folder but
    hidden temporaries and the pipeline's ``stage_config.yaml``.
    """
    out = Path(out_dir)
    manifest = out / MANIFEST
    if not manifest.is_file():
        return [f"{MANIFEST} is missing"]
    try:
        saved = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        return [f"{MANIFEST} cannot be read ({exc})"]
    if not isinstance(saved, dict) or saved.get("generator_version") != GENERATOR_VERSION:
        found = saved.get("generator_version") if isinstance(saved, dict) else None
        return [f"{MANIFEST} is of generator_version {found!r}, this reclora_ds writes {GENERATOR_VERSION}"]
    files = saved.get("files")
    if not isinstance(files, dict) or set(files) != set(DATA_FILES):
        return [f"{MANIFEST} does not list {list(DATA_FILES)} (written by an older reclora_ds?)"]
    return listing_problems(
        out,
        files,
        MANIFEST,
        also_allowed=(STAGE_CONFIG_FILE,),
        verify_sha256=[name for name, info in files.items() if "sha256" in info],
    )


def check_synthetic(out_dir: str | Path) -> dict[str, Any]:
    """The ``synthetic.json`` of a complete synthetic folder; :class:`SyntheticFolderError` naming the folder
    and every difference otherwise (:func:`synthetic_problems`)."""
    problems = synthetic_problems(out_dir)
    if problems:
        raise SyntheticFolderError(f"{out_dir}: not a complete synthetic dataset: " + "; ".join(problems))
    return json.loads((Path(out_dir) / MANIFEST).read_text())


def write_synthetic_ml25m(out_dir: str | Path, cfg: SyntheticConfig | None = None) -> SyntheticResult:
    """Write SYNTHETIC ``ratings.csv`` + ``movies.csv`` (ML-25M layout) and ``synthetic.json`` as the folder
    ``out_dir``, replacing an earlier synthetic folder whole.

    Everything is written into a temporary sibling folder, ``synthetic.json`` last (the config, and every
    file's size and sha256, row counts), and the folder is renamed into place
    (:func:`reclora_ds.files.atomic_dir`): a kill or a full disk at any moment leaves the previous folder as
    it was (a full disk raises :class:`reclora_ds.files.DiskFullError`). An existing non-empty folder
    without ``synthetic.json`` (user files) is refused with :class:`SyntheticFolderError` before anything is
    written. :func:`existing_synthetic` / :func:`check_synthetic` check a folder against its manifest.
    """
    cfg = cfg or SyntheticConfig()
    final = Path(out_dir)
    if final.is_dir() and not (final / MANIFEST).is_file():
        foreign = sorted(
            e.name for e in final.iterdir() if e.name != STAGE_CONFIG_FILE and not e.name.startswith(".")
        )
        if foreign:
            raise SyntheticFolderError(
                f"{final}: holds {foreign[:5]} but no {MANIFEST}: not a synthetic dataset written by "
                "reclora_ds, so it is not replaced (give an empty or new folder)"
            )
    final.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as out:
        if (final / STAGE_CONFIG_FILE).is_file():  # the pipeline's copy of the stage config
            shutil.copy2(final / STAGE_CONFIG_FILE, out / STAGE_CONFIG_FILE)
        result = _write_folder(out, cfg)
    result.raw_dir = final
    log.info("wrote synthetic %s (%d rows) in %.1fs", final, cfg.rows, result.seconds)
    return result


def _write_folder(out: Path, cfg: SyntheticConfig) -> SyntheticResult:
    """Write the data files and ``synthetic.json`` (last) into the (temporary) folder ``out``."""
    t0 = time.perf_counter()
    cat = _catalog(cfg)
    movies_rows = _write_movies(out / "movies.csv", cfg, cat)

    rated_id = cat.movie_id[cat.rated]
    users = _users(cfg, cat.added[cat.rated])
    added = users.added
    rng = _rng(cfg.seed, 0, 3)
    popularity = (rng.permutation(cfg.items) + ITEM_ZIPF_OFFSET) ** -ITEM_ZIPF_EXPONENT
    cum_pop = np.cumsum(popularity)
    quality = rng.normal(0.0, 0.5, cfg.items) + 0.3 * (np.log(popularity) - np.log(popularity).mean())

    forced_order = np.argsort(users.forced_user, kind="stable")
    forced_user_sorted = users.forced_user[forced_order]
    row_end = np.cumsum(users.count)
    cuts = np.searchsorted(row_end, np.arange(cfg.chunk_rows, cfg.rows, cfg.chunk_rows), side="left") + 1
    bounds = np.unique(np.concatenate([[0], cuts, [cfg.users]]))
    level_text = pa.array(RATING_LEVELS)
    path = out / "ratings.csv"
    schema = pa.schema(
        [("userId", pa.int64()), ("movieId", pa.int64()), ("rating", pa.string()), ("timestamp", pa.int64())]
    )
    options = pacsv.WriteOptions(include_header=False, quoting_style="none")
    with (
        open(path, "wb") as f,
        tqdm(total=cfg.rows, desc="synthetic ratings.csv", unit=" rows", unit_scale=True, leave=False) as bar,
    ):
        f.write((RATINGS_HEADER + "\n").encode())
        with pacsv.CSVWriter(f, schema, write_options=options) as writer:
            for k, (u0, u1) in enumerate(zip(bounds[:-1], bounds[1:])):
                crng = _rng(cfg.seed, 1, k)
                f0, f1 = np.searchsorted(forced_user_sorted, [u0, u1])
                local, item = _sample_chunk(
                    crng,
                    users.count[u0:u1],
                    users.available[u0:u1],
                    forced_user_sorted[f0:f1] - u0,
                    forced_order[f0:f1],
                    popularity,
                    cum_pop,
                )
                user = local + u0
                ts = _timestamps(crng, local, users.count[u0:u1], users.start[u0:u1], users.end[u0:u1])
                late = ts < added[item]  # not before the movie was added
                ts[late] = added[item[late]] + (
                    crng.random(int(late.sum())) * (users.end[user[late]] - added[item[late]])
                ).astype(np.int64)
                ts = np.clip(ts, FIRST_TIMESTAMP, LAST_TIMESTAMP)
                score = users.bias[user] + quality[item] + crng.normal(0.0, 0.85, len(user))
                level = _ratings(score, ts)
                table = pa.table(
                    {
                        "userId": pa.array(user + 1),
                        "movieId": pa.array(rated_id[item]),
                        "rating": level_text.take(pa.array(level)),
                        "timestamp": pa.array(ts),
                    },
                    schema=schema,
                )
                writer.write_table(table)
                bar.update(len(user))
    seconds = time.perf_counter() - t0
    files = {
        "ratings.csv": {"bytes": path.stat().st_size, "sha256": sha256_file(path), "rows": cfg.rows},
        "movies.csv": {
            "bytes": (out / "movies.csv").stat().st_size,
            "sha256": sha256_file(out / "movies.csv"),
            "rows": movies_rows,
        },
    }
    manifest = {
        "synthetic": True,
        "generator_version": GENERATOR_VERSION,
        "note": "made-up data in the MovieLens-25M layout (reclora_ds.data.synthetic); not real ratings",
        "config": dataclasses.asdict(cfg),
        "ratings_bytes": files["ratings.csv"]["bytes"],
        "movies_rows": movies_rows,
        "files": files,
        "seconds": round(seconds, 2),
    }
    write_json_atomic(out / MANIFEST, manifest)  # last
    return SyntheticResult(out, cfg, manifest["ratings_bytes"], movies_rows, seconds)


def existing_synthetic(out_dir: str | Path, cfg: SyntheticConfig) -> bool:
    """True if ``out_dir`` holds a complete synthetic dataset written with exactly ``cfg`` and unchanged
    since (:func:`synthetic_problems` finds nothing); False for a missing folder, another config, or a folder
    that differs from its manifest (then it is written again)."""
    if not Path(out_dir).is_dir() or synthetic_problems(out_dir):
        return False
    saved = json.loads((Path(out_dir) / MANIFEST).read_text())
    return saved.get("config") == dataclasses.asdict(cfg)

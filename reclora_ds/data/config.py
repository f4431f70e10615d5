"""The settings of stage 0 (``reclora-ds prepare``): raw files -> processed, time-ordered samples."""

from __future__ import annotations

import dataclasses
from pathlib import Path, PurePosixPath
from typing import ClassVar

from reclora_ds.data.specs import DATASET_SPECS

BUNDLED = "bundled"
"""The ``raw_dir`` value that names the bundled sample (real ml-latest-small, ML-25M layout)."""


def bundled_dataset(name: str = "ml-latest-small") -> Path:
    """Folder of a dataset vendored in the package (``reclora_ds/bundled/<name>``; ``ml-latest-small`` is
    real MovieLens in the ML-25M layout); ``raw_dir: bundled`` names it."""
    return Path(__file__).resolve().parents[1] / "bundled" / name


CSV_ORDERS = ("user_progress", "file")


@dataclasses.dataclass
class GoodreadsOptions:
    """Options of the GoodReads reader."""

    interactions_glob: str = "goodreads_interactions*.json.gz"
    """Interaction files (json.gz lines) relative to ``raw_dir``; the csv variant is used when none match."""
    books_glob: str = "goodreads_books*.json.gz"
    """Book metadata files (json.gz lines) relative to ``raw_dir``; optional for the csv variant."""
    timestamp_field: str = "date_added"
    """Which interaction date orders the rows: ``date_added`` (default) or ``date_updated``."""
    csv_order: str = "user_progress"
    """What stands in for the time in the csv variant, which has none. ``user_progress`` (default): a row's
    time is k / n_u, its position k among its user's n_u rows (in file order) over n_u, so the global 8:1:1
    split keeps about the first 80% of every user's rows for training and the last 10% for testing, as a
    temporal split of users active throughout does. ``file``: the line number; the UCSD file is grouped by
    user, so the split then follows blocks of users and validation / test hold mostly users unseen in
    training (a cold-start evaluation, not the paper's)."""

    def __post_init__(self) -> None:
        problems = []
        if self.csv_order not in CSV_ORDERS:
            problems.append(f"csv_order must be one of {list(CSV_ORDERS)}, got {self.csv_order!r}")
        if self.timestamp_field not in ("date_added", "date_updated"):
            problems.append(
                f"timestamp_field must be 'date_added' or 'date_updated', got {self.timestamp_field!r}"
            )
        for key in ("interactions_glob", "books_glob"):
            value = getattr(self, key)
            if not value.strip():
                problems.append(f"{key} is empty: give a file name pattern relative to raw_dir")
            elif PurePosixPath(value).is_absolute() or ".." in PurePosixPath(value).parts:
                problems.append(
                    f"{key}={value!r} must be a pattern relative to raw_dir (no absolute path, no ..)"
                )
        if problems:
            raise ValueError("; ".join(problems))


@dataclasses.dataclass
class PrepareConfig:
    """Stage 0: raw files -> processed, time-ordered samples (see ``reclora_ds.data.prepare``)."""

    dataset: str = "ml-25m"
    """Raw layout: ``ml-25m`` (ratings.csv + movies.csv; also ml-latest-small), ``ml-1m`` (*.dat), ``goodreads``."""
    raw_dir: str = BUNDLED
    """Folder holding the unchanged raw files, opened literally (no glob, no URL); ``bundled`` = the bundled
    ml-latest-small sample (replaced by its folder when the config is built; write ``./bundled`` for a
    folder of that name). Empty is an error."""
    output_dir: str = "outputs/processed"
    """Where the processed dataset (shards + metadata.json + config.yaml) is written: built beside it and
    renamed into place; an existing folder must be an earlier output of ``prepare`` (else refused)."""
    min_history: int = 5
    """A row becomes a sample only if its user has at least this many earlier rows (the authors' filter)."""
    kcore: int = 0
    """If > 0, iteratively keep only users and items with at least this many rows (the paper's '5-core')."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train/valid/test fractions of the samples, in global (timestamp, user, item) order."""
    few_shot_size: int = 70_000
    """Size of the fixed, seeded uniform subset of train that stage 2 tunes on (all of train when fewer)."""
    seed: int = 42
    """Seed of the few-shot subset (>= 0)."""
    shards_per_split: int = 8
    """Parquet shards per split (a multiple of the world size lets ``split_dataset_by_node`` split by file)."""
    batch_rows: int = 1_000_000
    """Rows per Arrow batch while streaming raw files (bounds memory of the reading step)."""
    strict: bool = False
    """Turn every counted drop of bad input (not the recipe's policy drops) into an error that names the
    file and line; re-rated (user, item) pairs included."""
    goodreads: GoodreadsOptions = dataclasses.field(default_factory=GoodreadsOptions)
    """Options of the GoodReads reader (used only with ``dataset=goodreads``)."""

    CONFIG_SECTION: ClassVar[str] = "prepare"
    """Config files hold these keys under ``prepare:`` (the saved ``config.yaml`` too)."""
    DOCUMENTED_DEFAULTS: ClassVar[dict[str, str]] = {"raw_dir": BUNDLED}
    """Defaults as docs/CONFIG.md shows them (``raw_dir`` holds the bundled folder once built)."""

    def __post_init__(self) -> None:
        problems = []
        if self.dataset not in DATASET_SPECS:
            problems.append(f"dataset must be one of {sorted(DATASET_SPECS)}, got {self.dataset!r}")
        if not self.raw_dir.strip():
            problems.append(
                f"raw_dir is empty: give the raw data folder, or {BUNDLED!r} for the bundled sample"
            )
        elif self.raw_dir == BUNDLED:
            if Path(BUNDLED).exists():
                problems.append(
                    f"raw_dir={BUNDLED!r} names the bundled sample, but ./{BUNDLED} also exists here: "
                    f"write ./{BUNDLED} for that folder (or rename it)"
                )
            else:
                self.raw_dir = str(bundled_dataset())
        if not self.output_dir.strip():
            problems.append("output_dir is empty: give the folder to write the processed dataset to")
        if self.min_history < 0:
            problems.append(f"min_history must be >= 0, got {self.min_history}")
        if self.kcore < 0:
            problems.append(f"kcore must be >= 0, got {self.kcore}")
        if len(self.split) != 3 or any(f <= 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            problems.append(f"split must be three positive fractions summing to 1, got {list(self.split)}")
        if self.few_shot_size < 1:
            problems.append(f"few_shot_size must be >= 1, got {self.few_shot_size}")
        if not 0 <= self.seed < 2**63:
            problems.append(f"seed must be in [0, 2**63), got {self.seed}")
        if self.shards_per_split < 1:
            problems.append(f"shards_per_split must be >= 1, got {self.shards_per_split}")
        if self.batch_rows < 1000:
            problems.append(f"batch_rows must be >= 1000, got {self.batch_rows}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def raw_path(self) -> Path:
        """The raw folder as a literal path (``~`` expanded, nothing else interpreted)."""
        return Path(self.raw_dir).expanduser()

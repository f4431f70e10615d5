"""The settings of stage 0 (``reclora-ds prepare``): raw files -> processed, time-ordered samples."""

from __future__ import annotations

import dataclasses

from reclora_ds.data.specs import DATASET_SPECS


@dataclasses.dataclass
class GoodreadsOptions:
    """Options of the GoodReads reader."""

    interactions_glob: str = "goodreads_interactions*.json.gz"
    """Interaction files (json.gz lines) relative to ``raw_dir``; the csv variant is used when none match."""
    books_glob: str = "goodreads_books*.json.gz"
    """Book metadata files (json.gz lines) relative to ``raw_dir``; optional for the csv variant."""
    timestamp_field: str = "date_added"
    """Which interaction date orders the rows: ``date_added`` (default) or ``date_updated``."""

    def __post_init__(self) -> None:
        if self.timestamp_field not in ("date_added", "date_updated"):
            raise ValueError(
                f"timestamp_field must be 'date_added' or 'date_updated', got {self.timestamp_field!r}"
            )


@dataclasses.dataclass
class PrepareConfig:
    """Stage 0: raw files -> processed, time-ordered samples (see ``reclora_ds.data.prepare``)."""

    dataset: str = "ml-25m"
    """Raw layout: ``ml-25m`` (ratings.csv + movies.csv; also ml-latest-small), ``ml-1m`` (*.dat), ``goodreads``."""
    raw_dir: str = ""
    """Folder holding the unchanged raw files. Empty = the bundled ml-latest-small sample."""
    output_dir: str = "outputs/processed"
    """Where the processed dataset (shards + metadata.json + config.yaml) is written."""
    min_history: int = 5
    """A row becomes a sample only if its user has at least this many earlier rows (the authors' filter)."""
    kcore: int = 0
    """If > 0, iteratively keep only users and items with at least this many rows (the paper's '5-core')."""
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Train/valid/test fractions of the samples, in global (timestamp, user, item) order."""
    few_shot_size: int = 70_000
    """Size of the fixed, seeded uniform subset of train that stage 2 tunes on (all of train when fewer)."""
    seed: int = 42
    """Seed of the few-shot subset."""
    shards_per_split: int = 8
    """Parquet shards per split (a multiple of the world size lets ``split_dataset_by_node`` split by file)."""
    batch_rows: int = 1_000_000
    """Rows per Arrow batch while streaming raw files (bounds memory of the reading step)."""
    strict: bool = False
    """Turn every counted drop into an error that names the file and line."""
    goodreads: GoodreadsOptions = dataclasses.field(default_factory=GoodreadsOptions)
    """Options of the GoodReads reader (used only with ``dataset=goodreads``)."""

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_SPECS:
            raise ValueError(f"dataset must be one of {sorted(DATASET_SPECS)}, got {self.dataset!r}")
        if self.min_history < 0:
            raise ValueError(f"min_history must be >= 0, got {self.min_history}")
        if self.kcore < 0:
            raise ValueError(f"kcore must be >= 0, got {self.kcore}")
        if len(self.split) != 3 or any(f <= 0 for f in self.split) or abs(sum(self.split) - 1.0) > 1e-6:
            raise ValueError(f"split must be three positive fractions summing to 1, got {list(self.split)}")
        if self.few_shot_size < 1:
            raise ValueError(f"few_shot_size must be >= 1, got {self.few_shot_size}")
        if self.shards_per_split < 1:
            raise ValueError(f"shards_per_split must be >= 1, got {self.shards_per_split}")
        if self.batch_rows < 1000:
            raise ValueError(f"batch_rows must be >= 1000, got {self.batch_rows}")

"""What differs between datasets: label rule, rating scale, categorical fields and item text.

A :class:`DatasetSpec` is plain data; the readers produce the raw columns it names and the preprocessing
encodes them. Field lists follow the paper (Table 1, Appendix A) and reclora-facts section 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DatasetSpec:
    """Per-dataset constants.

    Attributes:
        name: the config's ``dataset`` value.
        item_noun: "movie" or "book", used in item descriptions and prompts.
        positive_threshold: label = rating >= threshold (``inclusive``) or rating > threshold.
        rating_min, rating_max, rating_step: the valid scale; ratings off it are dropped.
        user_fields: categorical user attributes (besides ``user_id``) read from the user metadata.
        item_fields: categorical item attributes (besides ``item_id``) read from the item metadata.
        category_field: the item field SIM's hard search matches on.
        description: template of an item's text, formatted with the item's attribute strings.
    """

    name: str
    item_noun: str
    positive_threshold: float
    inclusive: bool
    rating_min: float
    rating_max: float
    rating_step: float
    user_fields: tuple[str, ...]
    item_fields: tuple[str, ...]
    category_field: str
    description: str

    def labels(self, rating: np.ndarray) -> np.ndarray:
        """Binary labels (int8) from raw ratings: ML-25M > 3.0, ML-1M >= 4, GoodReads >= 4."""
        positive = rating >= self.positive_threshold if self.inclusive else rating > self.positive_threshold
        return positive.astype(np.int8)

    def rating_valid(self, rating: np.ndarray) -> np.ndarray:
        """True where the rating is on the dataset's scale: in range and exactly on a step.

        Checked in float64 on the parsed text, exactly: every valid rating (0.5, 3.0, 4.5, ...) and step is
        exact in binary, so ``(rating - min) / step`` is an exact integer for them and ``3.0000004`` (off the
        grid by 4e-7) or ``3.0000000001`` is rejected. (Text that float64 cannot tell from a grid value,
        such as 17 zeros then a 1, parses to that value.)
        """
        rating = np.asarray(rating, dtype=np.float64)
        steps = (rating - self.rating_min) / self.rating_step
        on_grid = steps == np.round(steps)
        return (rating >= self.rating_min) & (rating <= self.rating_max) & on_grid

    def feature_columns(self) -> dict[str, tuple[str, str]]:
        """Encoded categorical features of a sample: field -> (table, column in users/items.parquet)."""
        out = {"user_id": ("users", "user_id")}
        out |= {f: ("users", f"{f}_id") for f in self.user_fields}
        out["item_id"] = ("items", "item_id")
        out |= {f: ("items", f"{f}_id") for f in self.item_fields}
        return out

    @property
    def label_rule(self) -> str:
        return f"rating {'>=' if self.inclusive else '>'} {self.positive_threshold:g}"


ML_25M = DatasetSpec(
    name="ml-25m",
    item_noun="movie",
    positive_threshold=3.0,
    inclusive=False,
    rating_min=0.5,
    rating_max=5.0,
    rating_step=0.5,
    user_fields=(),
    item_fields=("genre",),
    category_field="genre",
    description="Here is a movie. Its title is {title}. The movie's genre is {genre}.",
)

ML_1M = DatasetSpec(
    name="ml-1m",
    item_noun="movie",
    positive_threshold=4.0,
    inclusive=True,
    rating_min=1.0,
    rating_max=5.0,
    rating_step=1.0,
    user_fields=("gender", "age", "occupation", "zipcode"),
    item_fields=("genre",),
    category_field="genre",
    description="Here is a movie. Its title is {title}. The movie's genre is {genre}.",
)

GOODREADS = DatasetSpec(
    name="goodreads",
    item_noun="book",
    positive_threshold=4.0,
    inclusive=True,
    rating_min=1.0,
    rating_max=5.0,
    rating_step=1.0,
    user_fields=(),
    item_fields=("author", "publisher", "language", "format", "year", "pages", "avg_rating", "shelf"),
    category_field="shelf",
    description="Here is a book. Its title is {title}. The book's author is {author}. Its genre is {shelf}.",
)

DATASET_SPECS: dict[str, DatasetSpec] = {s.name: s for s in (ML_25M, ML_1M, GOODREADS)}

"""Bad raw input: errors that name the file, line and reason, and counted drops with their reasons.

Policy: a problem with a whole file (missing, empty, wrong header or delimiter, not UTF-8, truncated gzip)
is a :class:`RawDataError`. A problem with one row (an unparsable or out-of-range value, a duplicate, an
unknown id) drops that row and counts it under a reason in a :class:`DropLog`, with the first few
``file:line`` locations as examples; the counts go into the processed dataset's metadata, and
``strict=True`` turns the first drop into a :class:`RawDataError` instead. Accounting is exact:
raw rows = kept samples + rows dropped, summed over reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from reclora_ds.config import UserError

MAX_EXAMPLES = 5
# Drops that are the recipe's policy rather than bad input: strict mode does not turn them into errors.
POLICY_DROPS = frozenset({"history_only", "unrated_shelf", "kcore"})

# Every reason a row can be dropped, with the sentence that explains it in metadata.json.
DROP_REASONS: dict[str, str] = {
    "malformed_line": "the line does not have the expected number of fields",
    "user_id_invalid": "the user id is empty or not an integer",
    "item_id_invalid": "the item id is empty or not an integer",
    "rating_missing": "the rating is empty or NaN",
    "rating_invalid": "the rating is not a number",
    "rating_out_of_range": "the rating is outside the dataset's scale (or off its step)",
    "timestamp_invalid": "the timestamp cannot be parsed",
    "timestamp_out_of_range": "the timestamp is before 1970 or after 2100",
    "unrated_shelf": "GoodReads rating 0: shelved without a rating, not a negative",
    "duplicate_row": "same user, item and timestamp as an earlier row (the first is kept)",
    "rerated_pair": "the user rated the same item again later: only the latest rating is kept (re-rating policy)",
    "user_field_invalid": "a user attribute is not one of the dataset's documented codes (ML-1M README)",
    "title_missing": "the item has no title (its text view would be empty)",
    "duplicate_id": "the id appears on an earlier line of the metadata file (the first is kept)",
    "unknown_item": "the item id is not in the item metadata file",
    "unknown_user": "the user id is not in the user metadata file",
    "kcore": "removed by the k-core filter (user or item with fewer than k rows)",
    "history_only": "fewer than min_history earlier rows of the same user: kept as history, not a sample",
}


class RawDataError(UserError):
    """A raw file cannot be used; the message names the file, the line (when known) and the reason."""

    def __init__(self, path: str | Path, reason: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class PrepareSettingsError(UserError):
    """The settings leave nothing to work with on this data (``min_history``, ``kcore``, ``split``); the
    message names the key, the value and what it left."""

    def __init__(self, key: str, reason: str):
        self.key = key
        super().__init__(f"{key}: {reason}")


@dataclass
class DropLog:
    """Counts of dropped rows per reason, with a few ``file:line`` examples each."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    strict: bool = False

    def add(self, reason: str, count: int, locations: list[str] | None = None) -> None:
        """Record ``count`` dropped rows; in strict mode raise on the first one instead."""
        if reason not in DROP_REASONS:
            raise KeyError(f"unknown drop reason {reason!r}")
        if count <= 0:
            return
        locations = locations or []
        if self.strict and reason not in POLICY_DROPS:
            where, _, line = locations[0].rpartition(":") if locations else ("<input>", "", "")
            raise RawDataError(
                where, f"{DROP_REASONS[reason]} (strict mode)", int(line) if line.isdigit() else None
            )
        self.counts[reason] = self.counts.get(reason, 0) + int(count)
        ex = self.examples.setdefault(reason, [])
        ex.extend(locations[: MAX_EXAMPLES - len(ex)])

    def add_lines(self, reason: str, bad: np.ndarray, lines: np.ndarray, name: str) -> None:
        """Record the rows of one file where boolean ``bad`` is set; ``lines`` are their line numbers."""
        n = int(np.count_nonzero(bad))
        if n:
            self.add(reason, n, [f"{name}:{int(line)}" for line in lines[bad][:MAX_EXAMPLES]])

    def add_mask(
        self, reason: str, bad: np.ndarray, files: np.ndarray, lines: np.ndarray, names: list[str]
    ) -> None:
        """Record the rows where boolean ``bad`` is set, locating examples by file index and line."""
        n = int(np.count_nonzero(bad))
        if n == 0:
            return
        idx = np.flatnonzero(bad)[:MAX_EXAMPLES]
        self.add(reason, n, [f"{names[int(files[i])]}:{int(lines[i])}" for i in idx])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict[str, dict]:
        return {
            reason: {
                "count": self.counts[reason],
                "why": DROP_REASONS[reason],
                "examples": self.examples.get(reason, []),
            }
            for reason in sorted(self.counts)
        }

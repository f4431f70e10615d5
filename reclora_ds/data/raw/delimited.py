"""Line-exact streaming of delimited text files, opened literally.

Files are read by :func:`literal_lines` (the path exactly as given: no glob, no fsspec protocol; ``.gz``
decompressed) in Arrow string batches of ``batch_rows`` lines, so memory is bounded by one batch and every
row keeps its exact 1-based line number (blank lines are skipped and not counted as rows).
Each line is split on the delimiter with Arrow compute (or, for quoted csv, matched against a regex with
one named group per field); lines with the wrong number of fields are dropped and counted, and a file whose
first data lines all have the wrong count is rejected as a wrong delimiter. A UTF-8 byte order mark at the
start of the file is removed (also when the file is decoded as ISO-8859-1). Lines end with LF or CRLF; the
text builder opens files with universal newlines, so a lone CR also ends a line.

Measured with ``python benchmarks/bench_read_raw.py`` (5M-row ratings.csv, 2 shared cores, load ~5):
csv builder with typed columns 0.96M rows/s (but a bad value fails its whole batch with no line number),
csv builder with string columns + casts 0.46M rows/s, this text builder + split + casts 1.08M rows/s.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from reclora_ds.data.errors import DropLog, RawDataError

log = logging.getLogger(__name__)

_INT_RE = r"^\s*[+-]?\d+\s*$"
_INT64_MAX = str(np.iinfo(np.int64).max)
# A UTF-8 byte order mark, as decoded from UTF-8 and as decoded from ISO-8859-1 (movies.dat).
_BOMS = ("\ufeff", "\u00ef\u00bb\u00bf")
_FLOAT_RE = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"


@dataclass
class DelimitedBatch:
    """One batch of well-formed lines: a string column per field and the 1-based line numbers."""

    columns: dict[str, pa.Array]
    lines: np.ndarray  # int64 [n]
    raw_count: int  # non-blank data lines in this batch, malformed ones included

    def __len__(self) -> int:
        return len(self.lines)


def literal_lines(
    path: Path, encoding: str, batch_rows: int, *, keep_linebreaks: bool = False
) -> Iterator[pa.Array]:
    """Yield the lines of the file at exactly ``path`` in Arrow string arrays of ``batch_rows`` lines.

    The path is opened as it is: no glob (``raw[12]`` is that folder, not ``raw1``), no URL or fsspec
    protocol (``ml::small`` is a folder name), so the bytes read are the bytes :func:`sha256_file` hashes.
    ``.gz`` files are decompressed. Universal newlines: LF, CRLF and a lone CR end a line (and become
    ``\n`` when ``keep_linebreaks``). Decoding is strict (a UnicodeDecodeError propagates).
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding=encoding, newline=None) as stream:
        while True:
            lines = list(itertools.islice(stream, batch_rows))
            if not lines:
                return
            if not keep_linebreaks:
                lines = [line[:-1] if line.endswith("\n") else line for line in lines]
            array = pa.array(lines, pa.string())
            if isinstance(array, pa.ChunkedArray):  # past 2 GiB of text in one batch
                array = array.cast(pa.large_string()).combine_chunks()
            yield array


def _stream_lines(path: Path, encoding: str, batch_rows: int) -> Iterator[pa.Array]:
    """Yield the file's lines (no line breaks) in Arrow string arrays of about ``batch_rows``."""
    yield from literal_lines(path, encoding, batch_rows)


def first_bad_utf8_line(path: Path) -> tuple[int, str]:
    """Locate the first line of ``path`` that is not valid UTF-8 (slow path, only used on error)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return lineno, f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"
    return -1, "unknown position"


def read_delimited(
    path: Path,
    fields: list[str],
    delimiter: str,
    drops: DropLog,
    *,
    header: list[str] | None = None,
    encoding: str = "utf-8",
    batch_rows: int = 1_000_000,
    display_name: str | None = None,
    pattern: str | None = None,
) -> Iterator[DelimitedBatch]:
    """Stream ``path`` as rows of ``fields`` separated by ``delimiter`` (no quoting).

    Args:
        header: expected first line, split into names; ``None`` for header-less files (MovieLens .dat).
            The header must match exactly, otherwise a RawDataError names the difference.
        display_name: name used in drop examples (defaults to the file name).
        pattern: instead of splitting on ``delimiter``, match each line against this RE2 regex with one
            named group per field (see :func:`csv_line_pattern` for quoted csv); lines that do not match
            are malformed. Quotes are kept in the columns (:func:`unquote_csv` removes them).
    Raises:
        RawDataError: missing or empty file, wrong header, wrong delimiter, text not in ``encoding``.
    """
    name = display_name or path.name
    if not path.is_file():
        raise RawDataError(path, "file not found")
    if path.stat().st_size == 0:
        raise RawDataError(path, "file is empty")
    width = len(fields)
    line_offset = 0  # lines consumed before the current batch (blank ones included)
    seen_data = False
    try:
        for batch in _stream_lines(path, encoding, batch_rows):
            lines = np.arange(line_offset + 1, line_offset + 1 + len(batch), dtype=np.int64)
            line_offset += len(batch)
            if len(batch) and lines[0] == 1 and batch[0].is_valid and batch[0].as_py().startswith(_BOMS):
                first = batch[0].as_py()
                first = first[len(next(b for b in _BOMS if first.startswith(b))) :]
                batch = pa.concat_arrays([pa.array([first], batch.type), batch.slice(1)])
            if header is not None and len(batch) and lines[0] == 1:
                _check_header(path, batch[0].as_py(), header, delimiter)
                batch, lines = batch.slice(1), lines[1:]
            nonblank = pc.not_equal(pc.utf8_trim_whitespace(batch), "").to_numpy(zero_copy_only=False)
            if not nonblank.all():
                batch, lines = batch.filter(pa.array(nonblank)), lines[nonblank]
            if len(batch) == 0:
                continue
            if pattern is None:
                parts = pc.split_pattern(batch, delimiter)
                ok = pc.equal(pc.list_value_length(parts), width).to_numpy(zero_copy_only=False)
            else:
                parts = pc.extract_regex(batch, pattern)
                ok = pc.is_valid(parts).to_numpy(zero_copy_only=False)
            if not ok.any() and not seen_data:
                got = len(batch[0].as_py().split(delimiter))
                raise RawDataError(
                    path,
                    f"expected {width} fields ({', '.join(fields)}) separated by {delimiter!r}, found {got}: "
                    "wrong delimiter or not this dataset's layout",
                    int(lines[0]),
                )
            seen_data = True
            raw_count = len(lines)
            if not ok.all():
                bad = ~ok
                drops.add_lines("malformed_line", bad, lines, name)
                parts, lines = parts.filter(pa.array(ok)), lines[ok]
            if pattern is None:
                flat = pc.list_flatten(parts)
                columns = {
                    f: pc.utf8_trim_whitespace(flat.take(pa.array(np.arange(i, len(flat), width))))
                    for i, f in enumerate(fields)
                }
            else:
                columns = {f: pc.utf8_trim_whitespace(parts.field(f)) for f in fields}
            yield DelimitedBatch(columns, lines, raw_count)
    except UnicodeDecodeError as exc:
        line, where = first_bad_utf8_line(path)
        raise RawDataError(path, f"not valid {encoding} text ({where}): {exc.reason}", line) from None
    except (EOFError, OSError) as exc:
        if isinstance(exc, RawDataError):
            raise
        raise RawDataError(
            path, f"cannot read file ({exc.__class__.__name__}: {exc}); truncated or corrupt?"
        ) from None
    if not seen_data:
        raise RawDataError(path, "file has no data rows")


def csv_line_pattern(fields: list[str], delimiter: str = ",") -> str:
    """RE2 regex matching one csv line of ``fields``: each field is empty, unquoted (no delimiter, not
    starting with a quote) or double-quoted with ``""`` for a quote inside (RFC 4180, one line)."""
    if len(delimiter) != 1 or delimiter == '"':
        raise ValueError(f"csv delimiter must be one character other than a quote, got {delimiter!r}")
    d = re.escape(delimiter)
    field = f'(?:"(?:[^"]|"")*"|[^"{d}][^{d}]*|)'
    return "^" + d.join(f"\\s*(?P<{f}>{field})\\s*" for f in fields) + "$"


def unquote_csv(col: pa.Array) -> pa.Array:
    """Remove the quotes of double-quoted csv fields and undouble the ``""`` inside them."""
    quoted = pc.and_(pc.starts_with(col, '"'), pc.greater_equal(pc.utf8_length(col), 2))
    inner = pc.replace_substring(pc.utf8_slice_codeunits(col, 1, -1), '""', '"')
    return pc.if_else(quoted, inner, col)


def _check_header(path: Path, first_line: str, expected: list[str], delimiter: str) -> None:
    found = [c.strip().lstrip("\ufeff") for c in first_line.split(delimiter)]
    if found == expected:
        return
    if not first_line.strip():
        raise RawDataError(path, f"line 1 is blank; expected the header {delimiter.join(expected)}", 1)
    missing = [c for c in expected if c not in found]
    extra = [c for c in found if c not in expected]
    hint = ""
    if len(found) == 1 and delimiter not in first_line:
        hint = f"; the line has no {delimiter!r}: wrong delimiter?"
    raise RawDataError(
        path,
        f"header {found} does not match the expected {expected}"
        + (f"; missing {missing}" if missing else "")
        + (f"; unexpected {extra}" if extra else "")
        + hint,
        1,
    )


def parse_int(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (int64 values, valid mask). Invalid or null entries get 0 and ``valid=False``."""
    col = pc.fill_null(col, "")
    try:
        return pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False), np.ones(len(col), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # Slow path (some entry is bad): Arrow's cast rejects "+5", " 5" and values beyond int64, so the
        # entries the regex accepts are normalised and range-checked before casting.
        text = pc.replace_substring_regex(pc.utf8_trim_whitespace(col), r"^\+", "")
        digits = pc.utf8_ltrim(text, "+-0")
        n = pc.utf8_length(digits)
        fits = pc.or_(pc.less(n, 19), pc.and_(pc.equal(n, 19), pc.less_equal(digits, _INT64_MAX)))
        valid = pc.and_(pc.match_substring_regex(col, _INT_RE), fits).fill_null(False)
        values = pc.cast(pc.if_else(valid, text, "0"), pa.int64())
        return values.to_numpy(zero_copy_only=False), valid.to_numpy(zero_copy_only=False)


def parse_float(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Strings -> (float64 values, valid mask, missing mask). Empty and NaN count as missing; infinite
    values are not valid (whatever the other entries of the batch are)."""
    col = pc.fill_null(col, "")
    lowered = pc.utf8_lower(col)
    missing = pc.or_(pc.equal(lowered, ""), pc.is_in(lowered, pa.array(["nan", "na", "null", "none"])))
    missing_np = missing.to_numpy(zero_copy_only=False)
    try:
        values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        valid = np.isfinite(values)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ok = pc.match_substring_regex(col, _FLOAT_RE).fill_null(False)
        text = pc.utf8_trim_whitespace(col)  # Arrow's cast rejects surrounding blanks
        values = pc.cast(pc.if_else(ok, text, "0"), pa.float64()).to_numpy(zero_copy_only=False)
        valid = ok.to_numpy(zero_copy_only=False) & np.isfinite(values)
    return values, valid & ~missing_np, missing_np

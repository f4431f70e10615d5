"""Which `datasets` reading path for raw ratings files? Prints rows/s of each, side by side in one run.

    python benchmarks/bench_read_raw.py [--rows 5000000] [--workdir /tmp/reclora_bench_read]

Compared on one synthetic ratings.csv with the ML-25M schema:
  1. csv builder, typed columns (fast, but a bad value fails the whole batch without a line number);
  2. csv builder, string columns + Arrow casts (line-level errors possible);
  3. text builder + Arrow split + casts (what ``reclora_ds.data.raw.delimited`` does: exact line numbers,
     one path for ``,`` and ``::`` files).
All use streaming mode with Arrow-formatted batches of 1M rows (row-by-row streaming is ~50x slower).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from reclora_ds.data.errors import DropLog
from reclora_ds.data.raw.delimited import parse_float, parse_int, read_delimited

COLUMNS = ["userId", "movieId", "rating", "timestamp"]


def write_ratings(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "userId": rng.integers(1, 162_542, rows),
            "movieId": rng.integers(1, 209_172, rows),
            "rating": rng.integers(1, 11, rows) / 2,
            "timestamp": rng.integers(789_652_009, 1_574_327_703, rows),
        }
    )
    with open(path, "wb") as f:
        f.write((",".join(COLUMNS) + "\n").encode())
        pcsv.write_csv(table, f, pcsv.WriteOptions(include_header=False, quoting_style="none"))


def csv_typed(path: Path) -> int:
    features = datasets.Features(
        {
            "userId": datasets.Value("int64"),
            "movieId": datasets.Value("int64"),
            "rating": datasets.Value("float64"),
            "timestamp": datasets.Value("int64"),
        }
    )
    ds = datasets.load_dataset("csv", data_files=str(path), split="train", streaming=True, features=features)
    return sum(b.num_rows for b in ds.with_format("arrow").iter(batch_size=1_000_000))


def csv_strings(path: Path) -> int:
    features = datasets.Features({c: datasets.Value("string") for c in COLUMNS})
    ds = datasets.load_dataset("csv", data_files=str(path), split="train", streaming=True, features=features)
    n = 0
    for b in ds.with_format("arrow").iter(batch_size=1_000_000):
        for c, t in zip(COLUMNS, (pa.int64(), pa.int64(), pa.float64(), pa.int64())):
            pc.cast(b[c], t)
        n += b.num_rows
    return n


def text_split(path: Path) -> int:
    n = 0
    for batch in read_delimited(
        path, ["user", "item", "rating", "timestamp"], ",", DropLog(), header=COLUMNS
    ):
        parse_int(batch.columns["user"]), parse_int(batch.columns["item"])
        parse_float(batch.columns["rating"]), parse_int(batch.columns["timestamp"])
        n += len(batch)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--workdir", default="/tmp/reclora_bench_read")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"ratings_{args.rows}.csv"
    if not path.exists():
        write_ratings(path, args.rows)
    print(f"{'reader':<44} {'rows':>10} {'seconds':>8} {'rows/s':>12}")
    for name, fn in [
        ("csv builder, typed columns", csv_typed),
        ("csv builder, string columns + casts", csv_strings),
        ("text builder + split + casts (reclora_ds)", text_split),
    ]:
        t0 = time.perf_counter()
        n = fn(path)
        dt = time.perf_counter() - t0
        print(f"{name:<44} {n:>10,} {dt:>8.2f} {n / dt:>12,.0f}")


if __name__ == "__main__":
    main()

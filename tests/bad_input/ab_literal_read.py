"""A/B (not a test): line streaming of one ratings.csv by the `datasets` text builder (the reader before
issue #15, which globbed and parsed protocols in the path) and by ``literal_lines`` (opens the path
literally), alternating in one process. Figures: docs/DATA.md.

    python benchmarks/bench_read_raw.py --rows 2000000 --workdir /tmp/h5_bench_read   # writes the file
    python tests/bad_input/ab_literal_read.py /tmp/h5_bench_read/ratings_2000000.csv
"""

import sys
import time
from pathlib import Path

import datasets

from reclora_ds.data.raw.delimited import literal_lines

path = Path(sys.argv[1])


def hf():
    ds = datasets.load_dataset("text", data_files=str(path), split="train", streaming=True).with_format(
        "arrow"
    )
    return sum(len(t) for t in ds.iter(batch_size=1_000_000))


def lit():
    return sum(len(a) for a in literal_lines(path, "utf-8", 1_000_000))


for rnd in range(2):
    for name, fn in (("datasets text builder", hf), ("literal_lines", lit)):
        t = time.perf_counter()
        n = fn()
        dt = time.perf_counter() - t
        print(f"round {rnd} {name:<22} {n:>10,} lines {dt:6.2f} s {n / dt:>12,.0f} lines/s")

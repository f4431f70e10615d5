"""Write a SYNTHETIC MovieLens-25M-layout folder (made-up ratings) for benchmarks and tests.

    python -m reclora_ds.commands.make_synthetic_ml25m --out /tmp/ml25m-synth                 # ML-25M's full size
    python -m reclora_ds.commands.make_synthetic_ml25m --out /tmp/ml-small --rows 1000000     # users/items scaled

Thin wrapper over :func:`reclora_ds.data.synthetic.write_synthetic_ml25m`; the result is read with
``reclora-ds prepare dataset=ml-25m raw_dir=<out>``.
"""

from __future__ import annotations

import argparse
import sys

from reclora_ds.config import check_output_location, report_user_error, run_command
from reclora_ds.data.synthetic import (
    ML25M_RATINGS,
    SyntheticConfig,
    scaled_config,
    write_synthetic_ml25m,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder to write ratings.csv, movies.csv, synthetic.json")
    ap.add_argument("--rows", type=int, default=ML25M_RATINGS, help="rating rows (default: ML-25M's)")
    ap.add_argument("--users", type=int, help="users (default: ML-25M's share of --rows)")
    ap.add_argument("--items", type=int, help="rated movies (default: ML-25M's, scaled by sqrt of --rows)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# Files one of which every earlier output folder of this command holds (it may be reused or replaced).
OUTPUT_MARKERS = ("synthetic.json",)


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_output_location(args.out, "--out", OUTPUT_MARKERS, source="--out")  # before any heavy work
    base = scaled_config(args.rows, args.seed)
    try:
        cfg = SyntheticConfig(
            rows=args.rows,
            users=args.users if args.users is not None else base.users,
            items=args.items if args.items is not None else base.items,
            seed=args.seed,
        )
        result = write_synthetic_ml25m(args.out, cfg)
    except ValueError as exc:
        report_user_error(exc)
        return 2
    print(
        f"wrote SYNTHETIC ML-25M layout to {result.raw_dir}: {cfg.rows:,} ratings, {cfg.users:,} users, "
        f"{cfg.items:,} rated movies ({result.movies_rows:,} in movies.csv), "
        f"{result.ratings_bytes / 2**20:.0f} MiB, {result.seconds:.1f}s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user's mistake prints ``error: <file/key>: <reason>`` and returns 2 (no traceback)."""
    return run_command(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())

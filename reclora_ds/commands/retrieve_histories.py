"""Retrieve every sample's long (CRM) and short (prompt) history and store them beside the processed dataset.

    python -m reclora_ds.commands.retrieve_histories --processed runs/ml25m/data --index runs/ml25m/index [--ks 60 10]
    python -m reclora_ds.commands.retrieve_histories --processed runs/ml25m/data --mode recent      # the ablation

Writes ``<processed>/retrieved/<mode>/`` (``sample_ids.npy``, ``rows_k<K>.npy``, ``retrieval.json``); see
``reclora_ds/retrieval/retriever.py``. Exit status 2 with an ``error:`` line when an input is missing or
does not match (an index of another dataset, a directory that is not a processed dataset).
"""

from __future__ import annotations

import argparse
import logging
import sys

from reclora_ds.config import check_output_location, run_command
from reclora_ds.data.histories import RETRIEVAL_MODES
from reclora_ds.retrieval.engine import DEFAULT_KS
from reclora_ds.retrieval.errors import RetrievalInputError
from reclora_ds.retrieval.retriever import retrieve_histories


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processed", required=True, help="processed dataset directory (reclora-ds prepare)")
    ap.add_argument(
        "--index", help="FAISS index directory (tools/build_faiss_index.py); needed for similarity"
    )
    ap.add_argument("--mode", choices=RETRIEVAL_MODES, default="similarity")
    ap.add_argument(
        "--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="history lengths (default 60 10)"
    )
    ap.add_argument("--out", help="output directory (default <processed>/retrieved/<mode>)")
    return ap


# Files one of which every earlier output folder of this command holds (it may be reused or replaced).
OUTPUT_MARKERS = ("retrieval.json",)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_output_location(args.out, "--out", OUTPUT_MARKERS, source="--out")  # before any heavy work
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.mode == "similarity" and not args.index:
        print(
            "error: --mode similarity needs --index (build one with tools/build_faiss_index.py)",
            file=sys.stderr,
        )
        return 2
    try:
        result = retrieve_histories(args.processed, args.index, ks=args.ks, mode=args.mode, out_dir=args.out)
    except (RetrievalInputError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user's mistake prints ``error: <file/key>: <reason>`` and returns 2 (no traceback)."""
    return run_command(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())

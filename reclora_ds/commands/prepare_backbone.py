"""Fetch, convert and verify the default LLM backbone (SmolLM2-135M-Instruct) in the reclora_ds cache.

Usage (anywhere the package is installed; ``python tools/prepare_backbone.py`` in a checkout)::

    python -m reclora_ds.commands.prepare_backbone [--cache-dir DIR] [--verify-only]

Without ``--verify-only`` the backbone is downloaded and converted if it is missing or corrupt; with it,
nothing is downloaded and the exit status says whether the cached folder is complete and intact.
Prints a summary of the folder at the end; exits with status 1 and a one-line reason on failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from reclora_ds.backbone import (
    CACHE_ENV_VAR,
    BackboneError,
    BackboneSummary,
    describe_backbone,
    prepare_default_backbone,
    verify_default_backbone,
)
from reclora_ds.config import run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"cache root (default: ${CACHE_ENV_VAR}, else ~/.cache/reclora_ds)",
    )
    parser.add_argument(
        "--verify-only",
        action="store_true",
        help="only check the cached backbone against its manifest; download and convert nothing",
    )
    return parser.parse_args(argv)


def format_summary(summary: BackboneSummary, elapsed_seconds: float) -> str:
    """A human-readable report of a backbone folder and how long preparing it took."""
    parameters = f"{summary.num_parameters:,}" if summary.num_parameters is not None else "unknown"
    lines = [
        f"backbone:     {summary.path}",
        f"architecture: {summary.architecture}",
        f"parameters:   {parameters}",
        f"layers:       {summary.num_layers}",
        f"hidden size:  {summary.hidden_size}",
        f"vocab size:   {summary.vocab_size}",
        f"files ({len(summary.files)}, {summary.total_bytes / 1e6:.1f} MB):",
        *(f"  {name:<32} {size:>14,} B" for name, size in summary.files),
        f"time taken:   {elapsed_seconds:.1f} s",
    ]
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    """Prepare (or only verify) the default backbone and print its summary; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    try:
        if args.verify_only:
            backbone_dir = verify_default_backbone(args.cache_dir)
        else:
            backbone_dir = prepare_default_backbone(args.cache_dir)
        summary = describe_backbone(backbone_dir)
    except (BackboneError, OSError) as error:
        print(f"prepare_backbone: error: {error}", file=sys.stderr)
        return 1
    print(format_summary(summary, time.perf_counter() - started))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user's mistake prints ``error: <file/key>: <reason>`` and returns 2 (no traceback)."""
    return run_command(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())

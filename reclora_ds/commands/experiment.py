"""Run one of the paper's experiments (or your own spec): variants x seeds, shared stages once, one table.

    reclora-ds experiment --config launch/experiments/table3.yaml [--quick] [--dry-run] [--base PIPELINE.yaml]
        [section.key=value ...]

``--config`` takes a spec file, or the name of a shipped one (``table3``). ``--quick`` uses the spec's
``quick:`` block (the bundled data on 2 CPU cores); ``--dry-run`` prints the plan (which stage folders run,
which are reused, and by which runs) and runs nothing. ``--base`` swaps the base pipeline config (the same
experiment on another dataset: ``--base launch/configs/pipeline_goodreads.yaml``). Overrides are pipeline keys applied to every variant
(``plora.max_steps=4 pipeline.nproc=1``); one that a variant sets is an error. Library:
:mod:`reclora_ds.experiments`. Exit status 2 with ``error:`` lines for a bad spec, 1 for a failed stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys

from reclora_ds.config import ConfigError
from reclora_ds.experiments.run import run_experiment
from reclora_ds.experiments.spec import load_spec
from reclora_ds.pipeline.runner import PipelineError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="reclora-ds experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment spec (file, or a shipped name: table3)")
    parser.add_argument(
        "--quick", action="store_true", help="the spec's quick: block (bundled data, 2 CPU cores)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    parser.add_argument("--base", help="another base pipeline config (another dataset) for every variant")
    parser.add_argument("overrides", nargs="*", help="pipeline keys for every variant, e.g. pipeline.nproc=1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = load_spec(args.config, quick=args.quick)
        if args.base:
            spec = dataclasses.replace(spec, base=args.base)
        run_experiment(
            spec,
            args.overrides,
            dry_run=args.dry_run,
            command=shlex.join(["reclora-ds", "experiment", *argv]),
        )
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

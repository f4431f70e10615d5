"""The ``reclora-ds`` command: thin subcommands over library calls.

reclora-ds pipeline --config launch/configs/quickstart.yaml [--from STAGE] [section.key=value ...]
reclora-ds prepare --config launch/configs/quickstart.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import sys

from reclora_ds.config import ConfigError, PrepareConfig, load_config
from reclora_ds.data.errors import RawDataError


def _prepare(args: argparse.Namespace) -> int:
    from reclora_ds.data.prepare import prepare_dataset

    cfg = load_config(PrepareConfig, args.config, args.overrides, section="prepare")
    result = prepare_dataset(cfg)
    print(result.summary())
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from reclora_ds.pipeline.config import load_pipeline_settings
    from reclora_ds.pipeline.runner import PipelineError, run_pipeline

    settings = load_pipeline_settings(args.config, args.overrides)
    try:
        run_pipeline(settings, from_stage=args.from_stage)
    except (PipelineError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reclora-ds", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="raw dataset files -> processed, time-ordered samples")
    p.add_argument("--config", help="YAML file (its `prepare:` section, or the whole file)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. min_history=10 goodreads.timestamp_field=date_updated",
    )
    p.set_defaults(func=_prepare)
    p = sub.add_parser(
        "pipeline",
        help="the whole job: prepare -> SIM -> embeddings -> index -> retrieval -> CRM states -> "
        "LoRA/PLoRA -> report (reruns skip finished stages)",
    )
    p.add_argument(
        "--config", required=True, help="pipeline YAML (sections pipeline, prepare, sim, embeddings, plora)"
    )
    p.add_argument("--from", dest="from_stage", metavar="STAGE", help="redo this stage and every later one")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sim.epochs=2 plora.max_steps=10")
    p.set_defaults(func=_pipeline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ConfigError, RawDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``reclora-ds`` command: thin subcommands over library calls.

reclora-ds pipeline --config launch/configs/quickstart.yaml [--from STAGE] [section.key=value ...]
reclora-ds prepare --config launch/configs/quickstart.yaml [key=value ...]
reclora-ds <command> [args ...]      # = python -m reclora_ds.commands.<command> (train_sim, score, ...)

``--config`` takes a path; a shipped config that is not in the working directory is found by its bare
name (``--config quickstart.yaml``) or its repository path, in the package (:mod:`reclora_ds.package_data`).

User mistakes never end in a traceback: :func:`reclora_ds.config.run_command` (used by :func:`main` and by
every command's ``main``) catches the toolkit's user-error types (:func:`user_error_types`: bad configs, raw files, paths,
sidecars, checkpoints, ...), prints ``error: <file/key>: <reason>`` and returns 2. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from typing import NoReturn

from reclora_ds.config import (  # noqa: F401 - the entry points' error reporting, re-exported
    ConfigError,
    check_output_location,
    load_config,
    output_dir_problems,
    report_user_error,
    run_command,
    run_folder_check,
    user_error_types,
)
from reclora_ds.data.config import PrepareConfig
from reclora_ds.package_data import resolve_launch_config

COMMANDS_PACKAGE = "reclora_ds.commands"


def command_names() -> list[str]:
    """The modules of :mod:`reclora_ds.commands` (``reclora-ds <name>`` runs one), found without importing them."""
    package = importlib.import_module(COMMANDS_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg)


def _prepare(args: argparse.Namespace) -> int:
    from reclora_ds.data.prepare import check_prepare_paths, prepare_dataset

    config_path = resolve_launch_config(args.config)
    cfg = load_config(PrepareConfig, config_path, args.overrides, section=PrepareConfig.CONFIG_SECTION)
    check_prepare_paths(cfg, config_path)  # before the heavy imports and the reading
    result = prepare_dataset(cfg, config_path)
    print(result.summary())
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    """Config mistakes exit 2 before the first stage; a stage that fails exits 1 (its log says why)."""
    from reclora_ds.pipeline.config import load_pipeline_settings
    from reclora_ds.pipeline.runner import PipelineError, run_pipeline

    config_path = resolve_launch_config(args.config)
    settings = load_pipeline_settings(config_path, args.overrides)
    problems = []
    raw = settings.prepare.raw_path
    if not raw.is_dir():
        problems.append(f"prepare.raw_dir={settings.prepare.raw_dir!r}: no such folder")
    # the run folder is reused across reruns (finished stages are skipped): only where it goes is checked
    problems += output_dir_problems(
        settings.pipeline.run_dir, "pipeline.runs_dir/pipeline.name", protected=(config_path, raw)
    )
    if problems:
        raise ConfigError(problems, str(config_path))
    try:
        run_pipeline(settings, from_stage=args.from_stage)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reclora-ds", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("prepare", help="raw dataset files -> processed, time-ordered samples")
    p.add_argument("--config", help="YAML file with a `prepare:` section (a pipeline file works too)")
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
    for name in command_names():  # listed for --help; main() hands their arguments over unparsed
        sub.add_parser(name, help=f"python -m {COMMANDS_PACKAGE}.{name}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit status. A command of :mod:`reclora_ds.commands` gets the rest of
    the arguments as they are, and parses them itself."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in command_names():
        command = importlib.import_module(f"{COMMANDS_PACKAGE}.{argv[0]}")
        return run_command(lambda: command.main(argv[1:]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_command(lambda: args.func(args))


def run() -> NoReturn:
    """The ``reclora-ds`` console script and ``python -m reclora_ds``: :func:`main` through
    :func:`reclora_ds.distributed.run_and_exit`, as every entry point ends (a command such as
    ``train_plora`` may have made a process group; a plain process exits normally)."""
    from reclora_ds.distributed import run_and_exit
    from reclora_ds.malloc_preload import declare_process_entry

    declare_process_entry()  # a command run here (train_plora, score) may run this process again, preloaded
    run_and_exit(main)


if __name__ == "__main__":
    run()

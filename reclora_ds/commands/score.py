"""Per-sample p(yes) of a split: a trained stage-2 run (plora / lora) or the zero-shot backbone.

    python -m reclora_ds.commands.score --run runs/quickstart/plora --split test --out runs/quickstart/scores/test.parquet
    python -m reclora_ds.commands.score --mode zero_shot --config launch/configs/plora_quickstart.yaml --split valid \
        --max-samples 2000 --out zero_shot_valid.csv [key=value ...]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m reclora_ds.commands.score --run-dir RUN --split test --out test.parquet

Columns: sample_id, user, item, label, p (one row per sample, in the split's order = ascending sample_id).
``--run`` rebuilds the model from RUN/adapter (rec_llm.json) and the batches from RUN/config.yaml; the
overrides are dotted keys of that config (``data_dir=...``, ``backbone=...``) or of ``--config``'s
``plora:`` section. Under torchrun each rank scores its shard and rank 0 writes the file; write
``--run-dir`` there (torchrun's own parser takes ``--run`` for an abbreviation of its ``--run-path``).
The library call is :func:`reclora_ds.training.scoring.score_split`.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from reclora_ds.backbone import BackboneError
from reclora_ds.config import ConfigError, load_config, report_user_error, run_command
from reclora_ds.data.processed import ALL_SPLITS
from reclora_ds.distributed import destroy, init_distributed, is_main_process, run_and_exit
from reclora_ds.malloc_preload import AllocatorError, declare_process_entry, ensure_allocator
from reclora_ds.models.rec_llm import MODES
from reclora_ds.package_data import resolve_launch_config
from reclora_ds.training.adapter_io import AdapterConfigMismatchError, AdapterKeyError
from reclora_ds.training.checkpoint import CheckpointError
from reclora_ds.training.plora_config import PLoRATrainConfig
from reclora_ds.training.plora_recipe import AttentionFormError
from reclora_ds.training.scoring import (
    ScoringError,
    check_output_path,
    load_scoring_model,
    read_run_config,
    score_split,
)

BAD_INPUT = (
    ScoringError,
    AllocatorError,
    AttentionFormError,
    ConfigError,
    BackboneError,
    CheckpointError,
    AdapterConfigMismatchError,
    AdapterKeyError,
    FileNotFoundError,
)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        help="a stage-2 run folder (output_dir of launch/train_plora.py); --run-dir under torchrun",
    )
    parser.add_argument("--config", help="YAML with a `plora:` section, for --mode zero_shot without --run")
    parser.add_argument("--mode", choices=MODES, help="zero_shot: the bare backbone; default: the run's mode")
    parser.add_argument("--split", required=True, choices=list(ALL_SPLITS))
    parser.add_argument(
        "--max-samples",
        type=int,
        default=0,
        help="a seeded uniform sample of N ids of the split (eval_subset_seed); 0 = all",
    )
    parser.add_argument("--batch-size", type=int, default=0, help="samples per forward; 0 = eval_batch_size")
    parser.add_argument("--out", required=True, help="output .parquet or .csv")
    parser.add_argument("--device", help="default: this rank's GPU, else the CPU")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data_dir=runs/x/data")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if is_main_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.run is None and args.config is None:
        parser.error("give --run RUN_DIR, or --mode zero_shot --config CONFIG")
    if args.run is None and args.mode != "zero_shot":
        parser.error("without --run only --mode zero_shot can score (plora / lora need the trained adapter)")
    if args.max_samples < 0 or args.batch_size < 0:
        parser.error("--max-samples and --batch-size must be >= 0")

    t0 = time.perf_counter()
    try:
        check_output_path(args.out)
        config = None
        if args.run is None:
            config = load_config(
                PLoRATrainConfig,
                resolve_launch_config(args.config),
                args.overrides,
                section=PLoRATrainConfig.CONFIG_SECTION,
            )
        # the process may run itself again here, with a faster malloc (before any heavy work)
        settings = config if config is not None else read_run_config(args.run, args.overrides)
        cuda = torch.cuda.is_available() and (args.device or "cuda").startswith("cuda")
        ensure_allocator(settings.cpu_allocator, "plora.cpu_allocator", cuda=cuda)
        init_distributed()
        scoring = load_scoring_model(args.run, config, mode=args.mode, overrides=args.overrides)
        path = score_split(
            scoring,
            args.split,
            args.out,
            max_samples=args.max_samples,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.no_progress,
        )
    except BAD_INPUT as exc:
        destroy()  # bad input is seen by every rank alike
        report_user_error(exc)
        return 2
    except BaseException:
        destroy(synchronize=False)  # may be this rank's alone: no barrier that would wait for the others
        raise
    destroy()
    if path is not None:
        print(f"scores of {args.split} ({scoring.source}) -> {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user's mistake prints ``error: <file/key>: <reason>`` and returns 2 (no traceback)."""
    return run_command(lambda: _main(argv))


if __name__ == "__main__":
    declare_process_entry()  # this process's command line is this command's: it may run again preloaded
    run_and_exit(main)  # not sys.exit: see reclora_ds.distributed.run_and_exit

"""Stage 2: tune PLoRA (or LoRA; or evaluate zero-shot) of a frozen LLM on the few-shot split, DeepSpeed ZeRO-2.

    deepspeed --module reclora_ds.commands.train_plora --config launch/configs/plora_ml1m.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m reclora_ds.commands.train_plora --config launch/configs/plora_quickstart.yaml
    python -m reclora_ds.commands.train_plora --config launch/configs/plora_quickstart.yaml mode=zero_shot     # one process

Overrides are dotted keys of ``reclora_ds.training.plora_config.PLoRATrainConfig`` (``lr=5e-4 adapter.num_experts=8``;
the ``plora.`` prefix is optional). The recipe is :mod:`reclora_ds.training.plora_recipe`; this file only
parses and calls it.
"""

from __future__ import annotations

import argparse
import logging

import torch

from reclora_ds.config import check_output_location, load_config, run_command, run_folder_check
from reclora_ds.distributed import is_main_process, run_and_exit
from reclora_ds.malloc_preload import declare_process_entry, ensure_allocator
from reclora_ds.package_data import resolve_launch_config
from reclora_ds.training.plora_config import PLoRATrainConfig


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file with a `plora:` section (launch/configs/plora_*.yaml)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher adds it
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lr=5e-4 adapter.num_experts=8")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if is_main_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config_path = resolve_launch_config(args.config)
    cfg = load_config(PLoRATrainConfig, config_path, args.overrides, section=PLoRATrainConfig.CONFIG_SECTION)
    check_output_location(
        cfg.output_dir,
        "output_dir",
        run_folder_check(PLoRATrainConfig, PLoRATrainConfig.CONFIG_SECTION),
        source=str(config_path or "<command line>"),
        protected=(config_path,),
    )
    # the process may run itself again here, with a faster malloc (before the heavy imports)
    ensure_allocator(cfg.cpu_allocator, "plora.cpu_allocator", cuda=torch.cuda.is_available())
    from reclora_ds.training.plora_recipe import run_plora_training  # heavy: after the checks

    run_plora_training(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user's mistake prints ``error: <file/key>: <reason>`` and returns 2 (no traceback)."""
    return run_command(lambda: _main(argv))


if __name__ == "__main__":
    declare_process_entry()  # this process's command line is this command's: it may run again preloaded
    run_and_exit(main)  # not sys.exit: see reclora_ds.distributed.run_and_exit

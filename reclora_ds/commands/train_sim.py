"""Stage 1: train the CRM (SIM, DIN or logistic regression) on the full training split.

    torchrun --nproc_per_node 2 -m reclora_ds.commands.train_sim --config launch/configs/sim_quickstart.yaml [key=value ...]
    python -m reclora_ds.commands.train_sim --config launch/configs/sim_quickstart.yaml [key=value ...]     # one process

Overrides are dotted keys of ``reclora_ds.training.crm_config.CRMTrainConfig`` (``epochs=3 crm.embedding_dim=32``).
The recipe is :mod:`reclora_ds.training.crm_recipe`; this file only parses and calls it.
"""

from __future__ import annotations

import argparse
import logging

from reclora_ds.config import check_output_location, load_config, run_command, run_folder_check
from reclora_ds.distributed import is_main_process, run_and_exit
from reclora_ds.package_data import resolve_launch_config
from reclora_ds.training.crm_config import CRMTrainConfig


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of a CRMTrainConfig (launch/configs/sim_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=3 crm.dropout=0.1")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if is_main_process() else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config_path = resolve_launch_config(args.config)
    cfg = load_config(CRMTrainConfig, config_path, args.overrides)
    check_output_location(
        cfg.output_dir,
        "output_dir",
        run_folder_check(CRMTrainConfig, None),
        source=str(config_path or "<command line>"),
        protected=(config_path,),
    )
    from reclora_ds.training.crm_recipe import run_crm_training  # heavy: after the checks

    run_crm_training(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command; a user's mistake prints ``error: <file/key>: <reason>`` and returns 2 (no traceback)."""
    return run_command(lambda: _main(argv))


if __name__ == "__main__":
    run_and_exit(main)  # not sys.exit: see reclora_ds.distributed.run_and_exit

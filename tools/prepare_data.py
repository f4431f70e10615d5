"""Prepare a raw dataset: ``python tools/prepare_data.py --config launch/configs/prepare_ml1m.yaml raw_dir=...``.

Thin wrapper over ``reclora-ds prepare`` (see ``reclora_ds/data/prepare.py``).
"""

import sys

from reclora_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))

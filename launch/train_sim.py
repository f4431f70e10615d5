"""Stage 1: train the CRM (SIM, DIN, logistic regression or a Table 2 baseline) on the full training split.

A thin wrapper kept for the documented ``launch/train_sim.py`` commands: the code is
:mod:`reclora_ds.commands.train_sim` (``python -m reclora_ds.commands.train_sim``), whose docstring has
the usage.
"""

from reclora_ds.commands.train_sim import main
from reclora_ds.distributed import run_and_exit

if __name__ == "__main__":
    run_and_exit(main)  # not sys.exit: see reclora_ds.distributed.run_and_exit

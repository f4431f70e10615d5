"""Run one of the paper's experiments (a spec under launch/experiments/): variants x seeds, shared stages
computed once, tables with CIs and paired tests, plots and TensorBoard HParams.

A thin wrapper of :mod:`reclora_ds.commands.experiment` (``reclora-ds experiment``), whose docstring has the usage.
"""

from reclora_ds.commands.experiment import main
from reclora_ds.distributed import run_and_exit

if __name__ == "__main__":
    run_and_exit(main)  # not sys.exit: see reclora_ds.distributed.run_and_exit
